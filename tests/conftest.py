"""Fixtures shared across test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_msd


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-case MSD dataset (read-only: copy it before breaking it)."""
    return write_msd(tmp_path_factory.mktemp("tiny") / "Task01_Tiny")


@pytest.fixture(scope="session")
def shapes_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-image 2D PNG dataset (images/ + masks/, labels disc / square). Read-only."""
    from tests.helpers import write_shapes_dataset_2d

    return write_shapes_dataset_2d(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="session")
def prompted_run(shapes_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the tiny ``sam_unet_r34`` trained for one short epoch on :func:`shapes_2d`. Read-only."""
    from pipelines.train import TrainRequest, train
    from tests.helpers import prompted_config

    root = tmp_path_factory.mktemp("prompted-run")
    cfg = prompted_config(root / "tiny.yaml")
    train(TrainRequest(shapes_2d, config=cfg, out=root / "run", show_progress=False))
    return root / "run"


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the tiny segformer3d trained for one epoch on the tiny dataset (~10 s, once per session).

    Labels: ``background``, ``sphere``, ``box``; one input channel (MRI). Read-only: copy it before changing it.
    """
    from pipelines.train import TrainRequest, train
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("server-run")
    cfg = tiny_config(root / "tiny.yaml", epochs=1)
    run = root / "run"
    train(TrainRequest(tiny_dataset, config=cfg, out=run, show_progress=False))
    return run
