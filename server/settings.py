"""Server settings: a YAML file and/or environment variables prefixed ``MEDSEG_`` (nested with ``__``).

Read inside :func:`server.app.create_app`, never at import time. Example file::

    models_dir: /srv/medseg/models        # run directories and/or nnU-Net results folders
    data_dir: /srv/medseg/data            # job store (SQLite), uploads, results
    auth_enabled: true
    api_keys: ["change-me"]
    users: {radiologist: "secret"}       # for the MONAI Label /auth/token flow
    pacs:
      main: {url: "http://127.0.0.1:8042/dicom-web", username: orthanc, password: orthanc}

Replicas (see docs/distributed.md) share a PostgreSQL job store, a folder for job files and a token key::

    jobs_database_url: postgresql://medseg:PASSWORD@db:5432/medseg
    shared_dir: /shared                   # job inputs and results, the same folder on every replica
    token_secret: "at least 32 random characters"
    replica_id: medseg-1                  # optional; unique per replica
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from medseg.core.errors import ConfigError


class PacsSettings(BaseModel):
    """A DICOMweb server the service may pull from and push to; credentials live only here."""

    model_config = ConfigDict(extra="forbid")

    url: str
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 60.0


class Settings(BaseSettings):
    """Everything the server needs; safe defaults (auth on, CORS closed, bounded uploads and queue)."""

    model_config = SettingsConfigDict(env_prefix="MEDSEG_", env_nested_delimiter="__", extra="forbid")

    models_dir: Path = Path("models")
    data_dir: Path = Path("server-data")
    auth_enabled: bool = True
    api_keys: list[SecretStr] = Field(default_factory=list)
    users: dict[str, SecretStr] = Field(default_factory=dict)
    token_ttl_s: int = Field(3600, gt=0)
    cors_origins: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(1 << 30, gt=0)
    max_voxels: int = Field(512 * 512 * 1024, gt=0)
    zip_max_members: int = Field(10_000, gt=0)
    zip_max_total_bytes: int = Field(4 << 30, gt=0)
    max_queue: int = Field(8, ge=1)
    job_timeout_s: float = Field(900.0, gt=0)
    sync_timeout_s: float = Field(300.0, gt=0)
    device: str = "auto"
    model_version: str = "1"
    pacs: dict[str, PacsSettings] = Field(default_factory=dict)
    jobs_database_url: SecretStr | None = None
    shared_dir: Path | None = None
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    job_lease_s: float = Field(30.0, ge=0.5)
    worker_threads: int | None = Field(None, ge=1)  # torch threads of the job worker; None: torch's default
    token_secret: SecretStr | None = None

    @field_validator("jobs_database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("expected a PostgreSQL URL, postgresql://user:password@host:5432/database")
        return value

    @field_validator("token_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "token_secret must have at least 32 characters (it signs HS256 tokens); "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @model_validator(mode="after")
    def _replicas_share_a_secret(self) -> Settings:
        if self.jobs_database_url is not None and self.auth_enabled and self.token_secret is None:
            raise ValueError(
                "jobs_database_url is set (server replicas) but token_secret is not: every replica must sign and "
                "check bearer tokens with the same key; set token_secret (at least 32 random characters, the same "
                "on every replica), e.g. from the MEDSEG_TOKEN_SECRET environment variable"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (e.g. from the settings file or the CLI) win over the environment.
        return init_settings, env_settings

    @property
    def jobs_db(self) -> Path:
        """The SQLite job store (used when ``jobs_database_url`` is not set)."""
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        """Job inputs and results: ``shared_dir/jobs`` (the folder every replica mounts), else ``data_dir/jobs``."""
        return (self.shared_dir if self.shared_dir is not None else self.data_dir) / "jobs"

    def new_replica_id(self) -> str:
        """``replica_id``, or a default: the host name for the SQLite store (one server per data dir, so a restart
        recognises the jobs it left running), host name + pid + random suffix for PostgreSQL (unique per process)."""
        if self.replica_id is not None:
            return self.replica_id
        host = socket.gethostname()[:40] or "localhost"
        if self.jobs_database_url is None:
            return host
        return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional YAML file, the ``MEDSEG_`` environment and explicit overrides (in rising priority)."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"settings file {path} does not exist", hint="pass an existing YAML file to --settings")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"settings file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        )
        raise ConfigError(f"server settings are invalid: {problems}", hint="see server/settings.py") from None
