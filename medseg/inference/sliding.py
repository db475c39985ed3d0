"""Sliding-window inference with Gaussian blending and optional mirror test-time augmentation.

MONAI's ``sliding_window_inference`` does the tiling and blending; this module fixes medseg's choices (softmax
probabilities, flip TTA over every subset of spatial axes as nnU-Net does) behind one small function.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.models.card import ModelCard


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings.

    Attributes:
        roi_size: window size (each axis a multiple of the model's ``divisible_by``).
        overlap: fraction of overlap between windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` (centre-weighted) or ``constant``.
        tta: average over flips of every subset of spatial axes (8 passes in 3D).
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    tta: bool = False

    @classmethod
    def from_config(cls, config: ExperimentConfig, card: ModelCard) -> WindowSettings:
        """Settings of a run: its ``infer`` section, ROI from ``model.roi_size`` or else the card's."""
        inf = config.infer
        roi = tuple(config.model.roi_size or card.roi_size)
        return cls(roi, overlap=inf.overlap, sw_batch_size=inf.sw_batch_size, blend=inf.blend, tta=inf.tta)


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """All subsets of spatial axes, as tensor dims of ``(B, C, *S)`` (the empty subset first)."""
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def plain(x: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (MONAI's ``MetaTensor`` adds per-op overhead inside networks)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


@torch.no_grad()
def sliding_window_probs(model: nn.Module, image: torch.Tensor, settings: WindowSettings) -> torch.Tensor:
    """Softmax probabilities of ``model`` over a whole image.

    Args:
        model: a network in eval mode returning logits ``(B, C_out, *S)``.
        image: ``(B, C_in, *S)``; any size (smaller images are padded by MONAI and cropped back).
        settings: window settings.

    Returns:
        Probabilities ``(B, C_out, *S)`` on the image's device.
    """
    image = plain(image)
    spatial_dims = image.ndim - 2
    flips: Sequence[tuple[int, ...]] = flip_sets(spatial_dims) if settings.tta else [()]
    total: torch.Tensor | None = None
    for dims in flips:
        x = torch.flip(image, dims) if dims else image
        # The forward contract: in eval mode a network returns one logits tensor (no tuple or dict of outputs).
        logits = cast(
            torch.Tensor,
            sliding_window_inference(
                x,
                roi_size=settings.roi_size,
                sw_batch_size=settings.sw_batch_size,
                predictor=model,
                overlap=settings.overlap,
                mode=settings.blend,
            ),
        )
        probs = torch.softmax(plain(logits).float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)
