"""Fixtures shared across test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_msd


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-case MSD dataset (read-only: copy it before breaking it)."""
    return write_msd(tmp_path_factory.mktemp("tiny") / "Task01_Tiny")
