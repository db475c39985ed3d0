"""Training curves of a run directory (``curves.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.core.atomic import atomic_write


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
