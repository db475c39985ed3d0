"""The run directory and crash-safe checkpoint writes (written by training, read by every predictor).

``runs/<name>/``: ``config.yaml`` (resolved), ``card.json``, ``checkpoints/{last,best}.pt``, ``metrics.jsonl``,
``curves.png``, ``log.txt``. Every file except the append-only log is replaced atomically (temp file in the
same folder, fsync, ``os.replace``), so a crash leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.core.atomic import atomic_open
from medseg.core.errors import WeightsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def card(self) -> Path:
        return self.root / "card.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    def write_json(self, path: Path, data: Any) -> None:
        with atomic_open(path) as fh:
            json.dump(data, fh, indent=2)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Records of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a torn line in %s", self.metrics)
        return records

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        with atomic_open(self.metrics) as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temp file and ``os.replace``."""
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a medseg checkpoint with ``weights_only=True``; a missing or corrupt file raises ``WeightsError``."""
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist", hint="train first, or pass a run directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise WeightsError(f"checkpoint {path} cannot be read: {exc}".splitlines()[0], path=path) from None
