"""medseg: medical image segmentation on MONAI.

The public API is imported lazily so that ``import medseg`` (and the CLI) start fast::

    from medseg import load_image, save_mask, create_model, list_models, open_predictor
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_image": "medseg.io",
    "save_mask": "medseg.io",
    "create_model": "medseg.models",
    "list_models": "medseg.models",
    "open_predictor": "medseg.api",
    "is_model_folder": "medseg.api",
    "SegmentationPredictor": "medseg.inference.contract",
    "Prediction": "medseg.inference.prediction",
    "Predictor": "medseg.inference",
    "MedsegError": "medseg.core.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
