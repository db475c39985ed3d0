"""The models a server offers: every run directory (and nnU-Net results folder) under ``models_dir``, loaded once."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg import is_model_folder, open_predictor
from medseg.core.errors import MedsegError
from medseg.core.registry import did_you_mean
from medseg.inference.contract import SegmentationPredictor
from server.errors import ApiError

logger = logging.getLogger("server")


@dataclass
class ModelStore:
    """Name → loaded model; inference on one model is serialised by a lock (models are not re-entrant)."""

    models: dict[str, SegmentationPredictor] = field(default_factory=dict)
    source: dict[str, Path] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)

    @classmethod
    def load(cls, models_dir: Path, device: str = "auto") -> ModelStore:
        """Load every model folder directly under ``models_dir`` (broken ones are logged and skipped)."""
        store = cls()
        if not models_dir.is_dir():
            logger.warning("models directory %s does not exist: serving no models", models_dir)
            return store
        for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
            if not is_model_folder(folder):
                continue
            try:
                store.add(folder.name, open_predictor(folder, device=device), folder)
            except MedsegError as exc:
                logger.error("skipping model %s: %s", folder, exc.message)
        logger.info("serving models %s", store.names())
        return store

    def add(self, name: str, model: SegmentationPredictor, source: Path | None = None) -> None:
        self.models[name] = model
        self.locks[name] = threading.Lock()
        if source is not None:
            self.source[name] = source

    def names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> SegmentationPredictor:
        """The model ``name`` or a 404 with a suggestion."""
        if name not in self.models:
            hint = did_you_mean(name, self.names()) or f"available models: {self.names()}"
            raise ApiError(404, "NotFound", f"no model named {name!r}", hint=hint)
        return self.models[name]

    def describe(self, name: str) -> dict[str, Any]:
        """The card of ``name`` plus its label names (JSON-friendly)."""
        model = self.get(name)
        return {"name": name, "card": model.card.to_dict(), "label_names": list(model.label_names)}
