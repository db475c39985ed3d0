"""What every predictor returns: a mask on the input's grid, its label names and label statistics.

A leaf module (numpy, torch and MONAI's ``MetaTensor`` only), so writers, the CLI and the server can use the result
type without importing any predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["LabelStat", "Prediction", "label_statistics", "mask_dtype"]


@dataclass(frozen=True)
class LabelStat:
    """Size of one label in a mask."""

    name: str
    value: int
    voxels: int
    volume_ml: float


@dataclass
class Prediction:
    """A mask on the input's grid, with its label names and statistics.

    Attributes:
        mask: integer labels ``(X, Y, Z)`` as a ``MetaTensor`` whose affine is the input's.
        image: the input image ``(C, X, Y, Z)`` as loaded (the geometry reference for writers).
        label_names: names of label values 0..N-1.
        probabilities: class probabilities ``(C_out, X, Y, Z)`` when requested.
        stats: voxel count and volume of every foreground label.
    """

    mask: MetaTensor
    image: MetaTensor
    label_names: tuple[str, ...]
    probabilities: torch.Tensor | None = None
    stats: list[LabelStat] = field(default_factory=list)

    @classmethod
    def on_input_grid(
        cls,
        labels: torch.Tensor,
        image: MetaTensor,
        label_names: tuple[str, ...],
        probabilities: torch.Tensor | None = None,
    ) -> Prediction:
        """The prediction for ``labels (X, Y, Z)`` computed on the voxel grid of ``image (C, X, Y, Z)``.

        The mask takes the image's affine and meta data (so writers reproduce its geometry) and the smallest integer
        type that holds every label value; the statistics are computed here.
        """
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise ValueError(f"labels of shape {tuple(labels.shape)} are not on the image grid {tuple(image.shape)}")
        array = torch.as_tensor(labels).to(mask_dtype(len(label_names)))
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        mask = MetaTensor(array, affine=image.affine.clone(), meta=meta)
        return cls(
            mask=mask,
            image=image,
            label_names=tuple(label_names),
            probabilities=probabilities,
            stats=label_statistics(array, image.affine, tuple(label_names)),
        )

    def stats_dict(self) -> dict[str, Any]:
        """JSON-friendly label statistics."""
        return {
            "labels": {s.name: {"value": s.value, "voxels": s.voxels, "volume_ml": s.volume_ml} for s in self.stats},
            "label_names": list(self.label_names),
            "shape": [int(s) for s in self.mask.shape],
        }


def mask_dtype(n_labels: int) -> torch.dtype:
    """``uint8`` for fewer than 256 label values, else ``int32``."""
    return torch.uint8 if n_labels < 256 else torch.int32


def label_statistics(mask: torch.Tensor, affine: torch.Tensor, label_names: tuple[str, ...]) -> list[LabelStat]:
    """Voxel count and volume in mL of every foreground label of ``mask (X, Y, Z)``."""
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = torch.bincount(torch.as_tensor(mask).reshape(-1).long(), minlength=len(label_names))
    return [
        LabelStat(name, value, int(counts[value]), round(int(counts[value]) * voxel_ml, 3))
        for value, name in enumerate(label_names)
        if value > 0
    ]
