"""Registers nnU-Net v2 results folders with medseg's predictor openers (``medseg.open_predictor`` opens them).

Importing this module is cheap: it tests files only; nnunetv2 is imported when a folder is actually opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.inference.contract import SegmentationPredictor
from medseg.inference.openers import register_opener

NAME = "nnunet"


def is_results_folder(folder: Path) -> bool:
    """``{Trainer}__{Plans}__{configuration}/`` with ``plans.json`` and ``dataset.json``."""
    return (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def open_results_folder(
    root: Path,
    *,
    device: str = "auto",
    fold: int | str | Sequence[int | str] = 0,
    checkpoint: str = "checkpoint_final.pth",
    tta: bool = True,
    tile_step_size: float = 0.5,
    backend: str | None = None,
    precision: str | None = None,
    engine: bool = True,
    tta_axes: str | Sequence[int] | None = None,
) -> SegmentationPredictor:
    """See :meth:`medseg.integrations.nnunet.results.NnUNetResultsPredictor.from_folder`."""
    from medseg.integrations.nnunet.results import NnUNetResultsPredictor

    return NnUNetResultsPredictor.from_folder(
        root,
        fold=fold,
        checkpoint=checkpoint,
        device=device,
        tta=tta,
        tile_step_size=tile_step_size,
        backend=backend or "torch",
        precision=precision or "auto",
        engine=engine,
        tta_axes=tta_axes,
    )


register_opener(
    NAME,
    is_results_folder,
    open_results_folder,
    "an nnU-Net v2 results folder (plans.json, dataset.json, fold_X/checkpoint_final.pth)",
)
