"""The frozen model card every registered network carries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ModelCard:
    """What a network needs and promises; frozen so it can be shared safely.

    Attributes:
        name: registry name (lowercase), e.g. ``"segformer3d"``.
        task: ``"segmentation"`` or ``"classification"``.
        spatial_dims: 2 or 3.
        in_channels: input channels ``C_in`` of ``(B, C_in, *S)``.
        out_channels: output channels ``C_out`` (background included for segmentation).
        roi_size: patch / sliding-window size the paper used.
        divisible_by: every spatial axis of the input must be a multiple of this (per axis).
        target_spacing: voxel spacing in mm the network is trained at (``None``: keep the data's).
        intensity_preset: transform preset name (``"ct"``, ``"mri"``).
        label_names: names of the output channels, background first.
        needs_prompts: whether forward needs prompts (points / boxes) by keyword.
        output: how the logits become labels. ``"softmax"``: one channel per mutually exclusive class, background
            included, the label is the argmax. ``"sigmoid"``: each channel on its own, foreground where the logit is
            > 0 (sigmoid > 0.5); channels may overlap (the prompted SAM models: one mask per prompt).
        paper: citation with arXiv id.
        reference_params: parameter count of the paper's configuration (for tests and docs).
        reference_config: the keyword arguments that build the paper's configuration.
        min_size: smallest spatial size per axis the network accepts (``None``: any multiple of ``divisible_by``),
            e.g. where attention windows need feature maps of a minimum size.
    """

    name: str
    task: Literal["segmentation", "classification"]
    spatial_dims: int
    in_channels: int
    out_channels: int
    roi_size: tuple[int, ...]
    divisible_by: tuple[int, ...]
    target_spacing: tuple[float, ...] | None
    intensity_preset: str
    label_names: tuple[str, ...]
    needs_prompts: bool = False
    output: Literal["softmax", "sigmoid"] = "softmax"
    paper: str = ""
    reference_params: int | None = None
    reference_config: dict[str, Any] = field(default_factory=dict)
    min_size: tuple[int, ...] | None = None

    def replace(self, **changes: Any) -> ModelCard:
        """Return a copy with ``changes`` applied (the card itself never changes)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        for key in ("roi_size", "divisible_by", "label_names"):
            d[key] = tuple(d[key])
        for key in ("target_spacing", "min_size"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        # JSON / YAML turn the tuples of builder kwargs into lists; restore them so a round trip compares equal.
        d["reference_config"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in dict(d.get("reference_config") or {}).items()
        }
        return cls(**d)
