"""What produced a run or a checkpoint: command line, code revision, package versions, devices.

The stamp is plain data (strings, ints, bools) so it travels in every checkpoint, is written
beside ``config.yaml`` as ``provenance.json``, is logged by ``--eval``, and is compared on resume.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distributions whose versions are recorded, and their short names in log lines (DALI's wheel
# carries the CUDA major in its name).
_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "nvidia-dali-cuda130": "dali",
             "yacs": "yacs"}


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(world_size: int) -> Dict[str, Any]:
    """This process's stamp.

    Args:
        world_size: Processes of the run.
    """
    commit = _git("rev-parse", "HEAD")
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else \
        [f"cpu ({platform.machine()}, {os.cpu_count()} cores)"]
    return {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "devices": devices,
        "world_size": world_size,
        "host": platform.node(),
    }


def describe(stamp: Optional[Dict[str, Any]]) -> str:
    """One line for a log: revision, versions, devices and world size."""
    if not stamp:
        return "no provenance recorded"
    commit = stamp.get("git_commit")
    code = f"code {commit[:12]}{' (uncommitted changes)' if stamp.get('git_dirty') else ''}" if commit else \
        "code outside a git checkout"
    packages = ", ".join(f"{_PACKAGES.get(name, name)} {version}"
                         for name, version in stamp.get("packages", {}).items() if version)
    return (f"{code}; python {stamp.get('python')}, {packages}; {stamp.get('world_size')} process(es) on "
            f"{', '.join(sorted(set(stamp.get('devices') or [])))}")


def differences(saved: Optional[Dict[str, Any]], current: Dict[str, Any]) -> List[str]:
    """What differs between a checkpoint's stamp and this run's: code revision and package versions.

    Args:
        saved: The checkpoint's stamp (None for files written without one).
        current: This run's stamp.
    """
    if not saved:
        return []
    found = []
    if saved.get("git_commit") != current.get("git_commit") or saved.get("git_dirty") != current.get("git_dirty"):
        found.append(f"code {saved.get('git_commit') or '?'}{'+dirty' if saved.get('git_dirty') else ''} -> "
                     f"{current.get('git_commit') or '?'}{'+dirty' if current.get('git_dirty') else ''}")
    for key in ("python",):
        if saved.get(key) != current.get(key):
            found.append(f"{key} {saved.get(key)} -> {current.get(key)}")
    old, new = saved.get("packages", {}), current.get("packages", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            found.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return found
