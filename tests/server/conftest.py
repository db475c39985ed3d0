"""Server test fixtures: a tiny trained run, a models folder serving it as ``tiny``, settings and a model store.

Other server test files use these by name (pytest finds them); nothing here starts a process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.models import ModelStore
from server.settings import Settings, load_settings

API_KEY = "test-key"


@pytest.fixture(scope="session")
def models_dir(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models_dir`` holding a copy of :func:`tiny_run` named ``tiny``."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_run, root / "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_models(models_dir: Path) -> ModelStore:
    """The models of :func:`models_dir` loaded once on the CPU (pass to ``create_app(settings, models=...)``)."""
    return ModelStore.load(models_dir, "cpu")


@pytest.fixture()
def server_settings(models_dir: Path, tmp_path: Path) -> Settings:
    """Auth on with the key :data:`API_KEY`, CPU, a fresh data dir under ``tmp_path``."""
    return load_settings(models_dir=models_dir, data_dir=tmp_path / "server-data", api_keys=[API_KEY], device="cpu")


@pytest.fixture()
def auth_headers() -> dict[str, str]:
    """Headers carrying :data:`API_KEY`."""
    return {"X-API-Key": API_KEY}
