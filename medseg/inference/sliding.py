"""A run's sliding-window settings, and whole-image probabilities through the engine (validation during training).

The windows themselves are placed, weighted and accumulated by :mod:`medseg.inference.engine`; this module maps a
run's ``infer`` section onto :class:`~medseg.inference.engine.EngineSettings` and keeps the small helpers the trainer
and the predictors share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.inference.engine import EngineSettings, full_logits, mirror_subsets
from medseg.models.card import ModelCard


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings of a run.

    Attributes:
        roi_size: window size (each axis a multiple of the model's ``divisible_by``).
        overlap: fraction of overlap between windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` (centre-weighted) or ``constant``.
        tta: average over mirrored passes (every subset of ``tta_axes``).
        tta_axes: mirrored spatial axes (0-based); ``None``: all.
        accumulate: dtype of the engine's slab buffer.
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    tta: bool = False
    tta_axes: tuple[int, ...] | None = None
    accumulate: str = "float16"

    @classmethod
    def from_config(cls, config: ExperimentConfig, card: ModelCard) -> WindowSettings:
        """Settings of a run: its ``infer`` section, ROI from ``model.roi_size`` or else the card's."""
        inf = config.infer
        roi = tuple(config.model.roi_size or card.roi_size)
        return cls(
            roi,
            overlap=inf.overlap,
            sw_batch_size=inf.sw_batch_size,
            blend=inf.blend,
            tta=inf.tta,
            tta_axes=inf.tta_axes,
            accumulate=inf.accumulate,
        )

    def engine(self, tta: bool | None = None) -> EngineSettings:
        """The engine settings, with ``tta`` overriding the run's choice when given."""
        mirrored = self.tta if tta is None else tta
        axes = tuple(range(len(self.roi_size))) if self.tta_axes is None else self.tta_axes
        return EngineSettings(
            roi_size=tuple(int(r) for r in self.roi_size),
            overlap=self.overlap,
            batch_size=self.sw_batch_size,
            blend="constant" if self.blend == "constant" else "gaussian",
            mirrors=mirror_subsets(axes) if mirrored else ((),),
            accumulate="float32" if self.accumulate == "float32" else "float16",
        )


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """All subsets of spatial axes, as tensor dims of ``(B, C, *S)`` (the empty subset first)."""
    return [tuple(a + 2 for a in combo) for combo in mirror_subsets(range(spatial_dims))]


def plain(x: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (MONAI's ``MetaTensor`` adds per-op overhead inside networks)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


@torch.no_grad()
def sliding_window_probs(model: nn.Module, image: torch.Tensor, settings: WindowSettings) -> torch.Tensor:
    """Softmax of the engine's weighted mean logits of ``model`` over whole images.

    Args:
        model: a network in eval mode returning logits ``(B, C_out, *S)``.
        image: ``(B, C_in, *S)``; any size (smaller images are padded and cropped back).
        settings: window settings.

    Returns:
        Probabilities ``(B, C_out, *S)`` (float32) on the image's device.
    """
    image = plain(image)
    device = image.device
    engine = settings.engine()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return plain(model(x.to(device))).float().cpu()

    out = [torch.softmax(full_logits(forward, item.cpu(), engine), dim=0) for item in image]
    return torch.stack(out).to(device)
