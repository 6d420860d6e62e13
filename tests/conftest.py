"""pytest configuration and the fixtures several test files use."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

import models  # noqa: F401 - registers the variants with timm, for tests that create them by name
from tests.helpers import MODEL_DIR, TinyRun, run_main, write_tiny_yaml


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")


# `python -m pytest -q -n auto tests` (the README's command) runs the files in parallel processes
# (pytest-xdist): as many as this process may use CPUs, at most MAX_WORKERS. A file runs whole in
# one process, so its module fixtures (a trained run several tests read) are made once; the files
# marked slow, which start several training processes each, are handed out first, so that the
# quick in-process files fill the gaps at the end instead of one long file running alone.
MAX_WORKERS = 8


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> Optional[int]:
    """``-n auto``: the CPUs this process may run on, at most 8; with ``PYTEST_XDIST_AUTO_NUM_WORKERS``
    set, None leaves the count to xdist's own hook, which reads it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole files to each worker, in the order :func:`pytest_collection_modifyitems` leaves them."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep our order, not "most tests first"
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Under xdist, the files marked slow first (each keeps its own order); a serial run is left as collected."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.getparent(pytest.Module).get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def file_list_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Scanned file lists go to a temporary cache (XDG_CACHE_HOME), for this process and its subprocesses."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Runs in this process use one thread, as the subprocesses do (``OMP_NUM_THREADS=1``): the tiny
    models' kernels are too small to share, and two threads on a busy machine wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One complete ``python main.py --cfg tiny.yaml`` (2 epochs, EMA) for the tests that only read a
    finished run: they take its checkpoints and config and write elsewhere (their own ``--output``)."""
    root = tmp_path_factory.mktemp("tiny_run")
    yaml = write_tiny_yaml(root)
    trained = run_main("--cfg", str(yaml), "--output", str(root / "out"), cwd=root)
    assert trained.returncode == 0, trained.stderr[-2000:]
    return TinyRun(yaml, root / "out" / MODEL_DIR / "default", trained.stdout, trained.stderr)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test starts with torch.compile's caches empty: a model compiled by an earlier test leaves
    cache entries on the shared code objects, and a second model at another input size then
    recompiles them with dynamic shapes (minutes instead of seconds)."""
    yield
    if "torch._dynamo" in sys.modules:  # imported with timm; a reset of empty caches takes microseconds
        sys.modules["torch._dynamo"].reset()


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes of 48x48 toy JPEGs in the ImageNet layout: 120 train and 30 val images (read-only: copy to change)."""
    from data.toy import ToySpec, ensure_toy_dataset

    return ensure_toy_dataset(tmp_path_factory.mktemp("toy"), ToySpec(12, 3, 48))


@pytest.fixture(scope="session")
def toy_shards(toy_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`toy_folder` converted to tar shards of 25 samples (read-only: copy to change)."""
    from data.make_shards import convert

    destination = tmp_path_factory.mktemp("shards") / "toy"
    convert(toy_folder, destination, samples_per_shard=25, workers=1)
    return destination


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    """Path of a YAML config for a tiny model on synthetic 32x32 data (2 epochs, EMA and mixup on)."""
    return write_tiny_yaml(tmp_path)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """main() installs its own root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
