"""2D networks on medseg's 4D tensors: frame-by-frame windows, and masks put back on a modality's source frame.

medseg loads every image as ``(C, X, Y, Z)``: a PNG or a single X-ray / ultrasound frame is ``(C, X, Y, 1)``, an
angiography run or an ultrasound cine ``(C, X, Y, T)`` (the last axis is time). A 2D network (``card.spatial_dims ==
2``) therefore runs through the same sliding-window engine as a 3D one, with windows of depth 1,
``roi_size = (X_roi, Y_roi, 1)``: :func:`medseg.inference.engine.window_starts` then places one window per frame
(plane) and never blends neighbouring frames. :class:`FrameWise` is the module the engine calls: it drops the depth
axis of ``(B, C, X, Y, 1)`` windows before the 2D network and puts it back on the logits. Training uses the same
wrapper on its ``(B, C, X_roi, Y_roi, 1)`` patches.

Where the modality adapter cropped the image (the ultrasound region box), :func:`source_mask` pastes a predicted
mask back onto the source's full frame with the adapter's ``restore_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.errors import ModelInputError
from medseg.inference.sliding import WindowSettings
from medseg.io.modality import get_adapter

__all__ = ["FrameWise", "frame_roi", "frame_window", "source_mask"]


class FrameWise(nn.Module):
    """A 2D segmentation network applied to depth-1 windows of a volume or cine.

    Args:
        net: a 2D network ``(B, C_in, X, Y) -> (B, C_out, X, Y)`` (a list in training with deep supervision).

    Examples::

        >>> frames = FrameWise(create_model("unet2d", filters=(4, 8, 16), strides=(1, 2, 2))).eval()
        >>> frames(torch.zeros(2, 1, 64, 64, 1)).shape
        torch.Size([2, 2, 64, 64, 1])
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.card = getattr(net, "card", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C_in, X, Y, 1)`` -> logits ``(B, C_out, X, Y, 1)``; a 4D ``(B, C_in, X, Y)`` passes unchanged.

        Raises:
            ModelInputError: a 5D window deeper than one frame.
        """
        if x.ndim == 4:
            return self.net(x)
        if x.ndim != 5 or x.shape[-1] != 1:
            raise ModelInputError(
                f"a 2D network got windows of shape {tuple(x.shape)}",
                expected="(B, C, X, Y) or (B, C, X, Y, 1): one frame per window",
                hint="give the sliding window a depth of 1, roi_size (X, Y, 1)",
            )
        out = self.net(x[..., 0])
        if isinstance(out, list | tuple):
            return [o[..., None] for o in out]
        return out[..., None]


def frame_roi(roi_size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """The window of a model on 4D images: ``(X_roi, Y_roi, 1)`` for a 2D model's ``(X_roi, Y_roi)``, else as given."""
    roi = tuple(int(r) for r in roi_size)
    return (*roi, 1) if spatial_dims == 2 and len(roi) == 2 else roi


def source_mask(mask: torch.Tensor, meta: dict[str, Any]) -> MetaTensor:
    """A mask predicted on an adapter-loaded image, pasted back onto the source's full frame grid.

    Args:
        mask: labels ``(X, Y, T)`` on the loaded image's grid (e.g. ``Prediction.mask``).
        meta: the loaded image's meta data (it names ``modality_adapter``; the ultrasound adapter's ``crop_box``).

    Returns:
        Labels ``(X_src, Y_src, T)`` as a ``MetaTensor`` whose affine has the loaded spacing and origin 0 (the source
        frame's corner); a mask of an image no adapter loaded is returned as it is.
    """
    name = meta.get("modality_adapter")
    if not name:
        return mask if isinstance(mask, MetaTensor) else MetaTensor(mask)
    full = get_adapter(str(name)).restore_mask(mask, meta)
    affine = np.asarray(mask.affine if isinstance(mask, MetaTensor) else np.eye(4), dtype=np.float64).copy()
    affine[:3, 3] = 0.0
    out_meta = {k: v for k, v in meta.items() if k != "affine"}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(full)), affine=torch.from_numpy(affine), meta=out_meta)


def frame_window(window: WindowSettings) -> WindowSettings:
    """A 2D model's window settings on 4D images: depth-1 windows, mirroring over the two image axes only."""
    axes = window.tta_axes if window.tta_axes is not None else (0, 1)
    return dataclasses.replace(window, roi_size=frame_roi(window.roi_size, 2), tta_axes=tuple(a for a in axes if a < 2))
