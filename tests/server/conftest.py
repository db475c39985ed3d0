"""Server test fixtures: a tiny trained run, a models folder serving it as ``tiny``, settings and a model store.

Other server test files use these by name (pytest finds them); only :func:`postgres` (a throw-away PostgreSQL
cluster, once per session) and :func:`orthanc` (a loopback Orthanc, once per test module) start processes, for the
tests that ask for them.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.models import ModelStore
from server.settings import Settings, load_settings
from tests.server.orthanc import OrthancProcess, orthanc_missing_reason
from tests.server.pg import PgCluster, pg_bin_dir, pg_cluster

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgCluster]:
    """A PostgreSQL cluster on a free 127.0.0.1 port for the session; skipped when PostgreSQL is not installed."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    with pg_cluster(bin_dir) as cluster:
        yield cluster


@pytest.fixture()
def pg_url(postgres: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database of :func:`postgres`, dropped after the test."""
    name = f"t{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture()
def auth_headers() -> dict[str, str]:
    """Headers carrying :data:`API_KEY`."""
    return {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A loopback Orthanc with the DICOMweb plugin, one per test module (skipped where Orthanc is not installed)."""
    reason = orthanc_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with OrthancProcess.start(tmp_path_factory.mktemp("orthanc")) as process:
        yield process
