"""Device choice shared by the trainer and the predictor."""

from __future__ import annotations

import torch

from medseg.core.errors import ConfigError


def pick_device(choice: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a ``ConfigError``."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is visible", hint="use device auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")
