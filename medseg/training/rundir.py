"""The run directory (DESIGN.md §3) and crash-safe writes.

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

from medseg.core.atomic import atomic_open, atomic_write
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


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation Dice per epoch, as ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    val = [r for r in records if r.get("val_dice")]
    if val:
        names = list(val[0]["val_dice"])
        for name in names:
            ax_dice.plot([r["epoch"] for r in val], [r["val_dice"][name] for r in val], marker="o", label=name)
        ax_dice.plot([r["epoch"] for r in val], [r["val_mean_dice"] for r in val], "k--", label="mean")
        ax_dice.legend()
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
