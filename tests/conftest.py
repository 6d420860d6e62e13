"""Shared pytest configuration."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")


# --- training engine helpers (tests/test_engine*.py, test_checkpoint*.py) ---
import logging as _logging
import os as _os
import sys as _sys
from pathlib import Path as _Path
from typing import Iterator as _Iterator

import pytest as _pytest

REPO_ROOT = _Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in _sys.path:
    _sys.path.insert(0, str(REPO_ROOT))

# A real CrossFormer++ shrunk to a few hundred thousand parameters, on 32x32 synthetic data.
TINY_YAML = """\
DATA:
  DATASET: synthetic
  BATCH_SIZE: 8
  IMG_SIZE: 32
  SYNTHETIC_TRAIN_SIZE: 64
  SYNTHETIC_VAL_SIZE: 21
  NUM_WORKERS: 0
MODEL:
  NAME: crossformerpp_s
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.1
  CROSSFORMER:
    EMBED_DIM: 32
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 2, 4, 8]
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  AMP: none
  EMA:
    ENABLE: True
    DECAY: 0.9
AUG:
  AUTO_AUGMENT: ""
  REPROB: 0.0
THROUGHPUT:
  WARMUP_ITERS: 1
  ITERS: 2
PRINT_FREQ: 2
"""


@_pytest.fixture
def tiny_yaml(tmp_path: _Path) -> _Path:
    """Path of a YAML config for a tiny model on synthetic 32x32 data (2 epochs, EMA and mixup on)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def subprocess_env() -> dict:
    """Environment for running main.py in a subprocess: one thread per process, repo on the path."""
    env = dict(_os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), NO_COLOR="1")
    return env


@_pytest.fixture
def restore_logging() -> "_Iterator[None]":
    """main() installs its own root handlers; put pytest's back afterwards."""
    root = _logging.getLogger()
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
