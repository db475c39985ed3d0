"""Signed bearer tokens: a token from replica A is accepted by replica B (two apps on the same settings, the
PostgreSQL store), forged / expired / foreign / orphaned tokens are refused, and replicas without a shared secret are
refused at start-up. Apps run through ``TestClient`` (lifespan on, no job submitted, so no worker process starts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient

from medseg.core.errors import ConfigError
from server.app import create_app
from server.models import ModelStore
from server.security import TokenSigner
from server.settings import Settings, load_settings

USER, PASSWORD = "radiologist", "pw-0123456789"
SECRET = "replica-set-secret-0123456789-abcdef"


def _settings(models_dir: Path, data_dir: Path, **extra: object) -> Settings:
    return load_settings(models_dir=models_dir, data_dir=data_dir, users={USER: PASSWORD}, device="cpu", **extra)


def _token(client: TestClient, password: str = PASSWORD) -> str:
    r = client.post("/auth/token", data={"username": USER, "password": password, "grant_type": "password"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    return body["access_token"]


def _accepted(client: TestClient, token: str) -> bool:
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


@pytest.fixture()
def replicas(
    models_dir: Path, tiny_models: ModelStore, tmp_path: Path, pg_url: str
) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps on the same settings (PostgreSQL store, shared folder, one secret), each with its own data dir."""
    shared = dict(jobs_database_url=pg_url, shared_dir=tmp_path / "shared", token_secret=SECRET)
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(TestClient(create_app(_settings(models_dir, tmp_path / name, **shared), tiny_models)))
            for name in ("a", "b")
        )
        yield a, b


def test_a_token_from_replica_a_is_accepted_by_replica_b(replicas: tuple[TestClient, TestClient]) -> None:
    a, b = replicas
    token = _token(a)
    assert _accepted(b, token) and _accepted(a, token)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="medseg")
    assert claims["sub"] == USER and claims["exp"] - claims["iat"] == 3600
    assert a.app.state.jobs.replica_id != b.app.state.jobs.replica_id  # type: ignore[attr-defined]


def test_forged_expired_and_orphaned_tokens_are_refused(replicas: tuple[TestClient, TestClient]) -> None:
    _, b = replicas
    now = int(time.time())
    good = {"sub": USER, "iat": now, "exp": now + 600, "iss": "medseg"}
    assert _accepted(b, jwt.encode(good, SECRET, algorithm="HS256"))  # the claims below differ in one thing each
    other_key = jwt.encode(good, "another-secret-of-the-same-length-000000", algorithm="HS256")
    expired = jwt.encode({**good, "iat": now - 700, "exp": now - 60}, SECRET, algorithm="HS256")
    unsigned = jwt.encode(good, None, algorithm="none")
    foreign_issuer = jwt.encode({**good, "iss": "someone-else"}, SECRET, algorithm="HS256")
    removed_user = jwt.encode({**good, "sub": "no-longer-configured"}, SECRET, algorithm="HS256")
    no_expiry = jwt.encode({k: v for k, v in good.items() if k != "exp"}, SECRET, algorithm="HS256")
    for token in (other_key, expired, unsigned, foreign_issuer, removed_user, no_expiry, "not-a-token"):
        assert not _accepted(b, token), token


def test_without_a_secret_each_process_signs_with_its_own_key(
    models_dir: Path, tiny_models: ModelStore, tmp_path: Path
) -> None:
    # The single-machine default: no token_secret, a random key per process, so a token dies with its server.
    with (
        TestClient(create_app(_settings(models_dir, tmp_path / "one"), tiny_models)) as one,
        TestClient(create_app(_settings(models_dir, tmp_path / "two"), tiny_models)) as two,
    ):
        token = _token(one)
        assert _accepted(one, token) and not _accepted(two, token)


def test_replicas_without_a_shared_secret_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_secret"):
        load_settings(data_dir=tmp_path, jobs_database_url="postgresql://medseg@db:5432/medseg")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_settings(data_dir=tmp_path, jobs_database_url="postgresql://medseg@db/medseg", token_secret="short")
    with pytest.raises(ConfigError, match="PostgreSQL URL"):
        load_settings(data_dir=tmp_path, jobs_database_url="mysql://medseg@db/medseg", token_secret=SECRET)
    open_replicas = load_settings(data_dir=tmp_path, jobs_database_url="postgresql://db/medseg", auth_enabled=False)
    assert open_replicas.token_secret is None  # no tokens to check when auth is off
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSigner(b"short", 60)
