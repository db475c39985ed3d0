"""The facade's entry points that wire the library's rooms together (integrations included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import medseg.integrations.nnunet.opener  # noqa: F401  (registers nnU-Net results folders)
from medseg.inference.contract import SegmentationPredictor
from medseg.inference.openers import is_model_folder as _is_model_folder
from medseg.inference.openers import open_registered

__all__ = ["is_model_folder", "open_predictor"]


def open_predictor(path: str | Path, *, device: str = "auto", **options: Any) -> SegmentationPredictor:
    """Open any model folder medseg knows as a :class:`~medseg.inference.contract.SegmentationPredictor`.

    Recognised: a medseg run directory (``config.yaml`` + ``checkpoints/``; option ``checkpoint="best"|"last"``)
    and an nnU-Net v2 results folder (``plans.json`` + ``dataset.json`` + ``fold_X/``; options ``fold``,
    ``checkpoint``, ``tta``, ``tile_step_size``).

    Args:
        path: the model folder.
        device: ``auto``, ``cpu`` or ``cuda``.
        **options: the options of that kind of folder.

    Returns:
        A predictor: ``card``, ``label_names``, ``needs_prompts``, ``check_input(image, prompts)``,
        ``predict(image, *, prompts=None, tta=None) -> Prediction``.

    Raises:
        ConfigError: not a model folder, or an option that does not apply to it.
        WeightsError: its weights are missing or unreadable.

    Examples::

        >>> predictor = medseg.open_predictor("runs/demo")
        >>> result = predictor.predict("subject.nii.gz")
    """
    return open_registered(path, device=device, **options)


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a model folder :func:`open_predictor` can open."""
    return _is_model_folder(Path(folder))
