"""Server settings: a YAML file and/or environment variables prefixed ``MEDSEG_`` (nested with ``__``).

Read inside :func:`server.app.create_app`, never at import time. Example file::

    models_dir: /srv/medseg/models        # run directories and/or nnU-Net results folders
    data_dir: /srv/medseg/data            # job store (SQLite), uploads, results
    auth_enabled: true
    api_keys: ["change-me"]
    users: {radiologist: "secret"}       # for the MONAI Label /auth/token flow
    pacs:
      main: {url: "http://127.0.0.1:8042/dicom-web", username: orthanc, password: orthanc}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
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
        return self.data_dir / "jobs.sqlite3"


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
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"server settings are invalid: {problems}", hint="see server/settings.py") from None
