"""pytest configuration and the fixtures several test files use."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import write_tiny_yaml


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")


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
