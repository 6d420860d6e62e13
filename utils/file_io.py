"""Atomic checkpoint files: write to a temp file, fsync, rename; safe reads; stale temp-file clean-up.

A crash at any point leaves either the old file or the complete new one under a checkpoint's
name, never a partial file. Temp files are named ``.NAME.tmp-PID`` beside their destination.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Callable, Dict

import torch

logger = logging.getLogger(__name__)

_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a file that a library wrote and closed to the disk.

    Args:
        path: The file.
    """
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def usual_file_mode() -> int:
    """The permissions this user's new files get: 0666 less the umask (e.g. 0644 under umask 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_publish(path: str, write: Callable[[str], None], shared: bool = False) -> None:
    """Atomically make ``path`` the file that ``write(tmp)`` produces: temp file, rename, fsync the
    directory; on any failure the temp file is removed and ``path`` is untouched.

    Args:
        path: Destination.
        write: Writes the complete file (and fsyncs it) at the temp path it is given.
        shared: Give the file the permissions of any new file of the user (:func:`usual_file_mode`)
            whatever ``write`` created it with (safetensors creates 0600 files): for files meant to be shared.
    """
    tmp = _temp_path(path)
    try:
        write(tmp)
        if shared:
            os.chmod(tmp, usual_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj: Any, path: str, shared: bool = False) -> None:
    """``torch.save`` to a temp file, fsync, then rename over ``path``.

    Args:
        obj: What to save.
        path: Destination.
        shared: See :func:`atomic_publish`.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_publish(path, write, shared)


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename).

    Args:
        text: The contents.
        path: Destination.
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_publish(path, write)


def atomic_copy(src: str, dst: str) -> None:
    """Make ``dst`` an atomic copy of the complete file ``src`` (a hard link where possible).

    Args:
        src: An existing, complete file.
        dst: Destination in the same directory tree.
    """
    def write(tmp: str) -> None:
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 24)
                fout.flush()
                os.fsync(fout.fileno())

    atomic_publish(dst, write)


def load_file(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint file without executing arbitrary pickled code (``weights_only=True``).

    Args:
        path: The file.
        map_location: Where tensors go.
        mmap: Map tensors lazily (cheap peeking at the counters of big files).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path given to --resume / --pretrained")
    if path.endswith(".onnx"):  # the format follows the suffix
        raise ValueError(f"{path} is an ONNX graph, not PyTorch weights: this command reads a training checkpoint "
                         "or a .pth / .safetensors export; pass the checkpoint the .onnx was exported from, or run "
                         "the .onnx with onnxruntime (docs/deploy.md)")
    try:
        if path.endswith(".safetensors"):  # a bare state dict (deploy.export writes them)
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(path, device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - the message names the cause
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "it is truncated, corrupt or holds pickled objects other than tensors and "
                         "plain data: re-save it as {'model': state_dict}") from e


def remove_stale_temp_files(directory: str) -> None:
    """Delete partial temp files (``.NAME.tmp-PID``: checkpoints, config, provenance) a killed writer left.

    Only files of this module's temp-file pattern written by another process are touched;
    complete files never are.

    Args:
        directory: The run directory (call on rank 0, before training).
    """
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        match = _TEMP_RE.match(name)
        if match and int(match.group(1)) != os.getpid():
            os.remove(os.path.join(directory, name))
            logger.info("removed %s: an incomplete file left by a killed run", name)
