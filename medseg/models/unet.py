"""The nnU-Net ``3d_fullres``-like U-Net baseline, built on MONAI ``DynUNet``.

Paper: F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen, K. H. Maier-Hein, "nnU-Net: a self-configuring method
for deep learning-based biomedical image segmentation", Nature Methods 2021 (arXiv:1809.10486). Network from MONAI
(:class:`monai.networks.nets.DynUNet`), which re-implements the nnU-Net topology.

Faithful to what nnU-Net plans for an isotropic 128^3 patch:
    * 6 resolution stages (5 downsamplings by strided convolution), 3x3x3 kernels, two conv-norm-act per stage,
      filters 32/64/128/256/320/320 (doubling, capped at 320), InstanceNorm (affine), LeakyReLU(0.01), plain
      (non-residual) blocks, transposed-convolution upsampling with kernel = stride, skip concatenation,
      1x1x1 output convolution; He (Kaiming, a=0.01) initialisation.
    * Optional deep supervision on the decoder levels below full resolution.

Deviations and why:
    * The topology is fixed by keyword arguments (``filters``, ``strides``) instead of being planned from a dataset
      fingerprint; medseg's planner can pass the planned values.
    * MONAI's convolutions have no bias (each is followed by an affine InstanceNorm, so a bias is redundant);
      nnU-Net keeps it. The parameter count therefore differs slightly from nnU-Net's.
    * Deep supervision: MONAI upsamples the auxiliary outputs to full resolution (nnU-Net downsamples the target
      instead) and returns them stacked; medseg returns a **list** ``[full-res, aux_1, ..., aux_n]`` (full
      resolution first). Only ``deep_supr_num`` auxiliary outputs are produced (nnU-Net: all but the lowest level).
    * Inputs are validated with :func:`medseg.models.checks.check_input`: each spatial axis must be a multiple of
      the product of the strides on that axis (``2^5 = 32`` for the default configuration), and the bottleneck must
      hold more than one voxel (InstanceNorm cannot normalise a single value), so ``(32, 32, 32)`` is refused while
      ``(32, 32, 64)`` works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import Tensor

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models.card import ModelCard
from medseg.models.checks import check_input
from medseg.models.registry import register_model

__all__ = ["UNet", "unet", "unet2d"]

_FILTERS = (32, 64, 128, 256, 320, 320)
_STRIDES = (1, 2, 2, 2, 2, 2)
#: nnU-Net's ``2d`` configuration for a 512^2 patch: 7 stages (6 downsamplings), filters 32 doubling to 512.
_FILTERS_2D = (32, 64, 128, 256, 512, 512, 512)
_STRIDES_2D = (1, 2, 2, 2, 2, 2, 2)
_NORM = ("INSTANCE", {"affine": True})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def _per_axis(stride: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return (int(stride),) * spatial_dims if isinstance(stride, int) else tuple(int(s) for s in stride)


class UNet(DynUNet):
    """nnU-Net-like U-Net (MONAI ``DynUNet``) with medseg's forward contract.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (classes, background included).
        filters: channels of each resolution stage (one per entry of ``strides``).
        strides: stride of the first conv of each stage; the first is 1, the others 2 (or per axis, e.g.
            ``(1, 2, 2)`` for anisotropic data). ``len(strides) - 1`` downsamplings.
        kernel_size: convolution kernel size of every stage (nnU-Net: 3).
        deep_supervision: in training mode also return ``deep_supr_num`` auxiliary outputs.
        deep_supr_num: number of auxiliary outputs; must be below the number of downsamplings.
        spatial_dims: 3 (or 2 for a 2D U-Net).

    Examples::

        >>> net = UNet(1, 2, deep_supervision=True).train()
        >>> [o.shape for o in net(torch.zeros(2, 1, 64, 64, 64))][0]
        torch.Size([2, 2, 64, 64, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Sequence[int] = _FILTERS,
        strides: Sequence[int | Sequence[int]] = _STRIDES,
        kernel_size: int = 3,
        deep_supervision: bool = False,
        deep_supr_num: int = 3,
        spatial_dims: int = 3,
    ) -> None:
        if len(strides) < 3 or len(filters) != len(strides):
            raise ConfigError(
                f"unet: {len(filters)} filters and {len(strides)} strides",
                expected="one filter count per stride and at least 3 stages",
                hint="e.g. filters=(32, 64, 128, 256, 320, 320), strides=(1, 2, 2, 2, 2, 2)",
            )
        per_axis = [_per_axis(s, spatial_dims) for s in strides]
        if any(len(s) != spatial_dims or min(s) < 1 for s in per_axis):
            raise ConfigError(
                f"unet: strides={tuple(strides)} are invalid", expected=f"positive, {spatial_dims} per axis"
            )
        if deep_supervision and not 1 <= deep_supr_num < len(strides) - 1:
            raise ConfigError(
                f"unet: deep_supr_num={deep_supr_num} with {len(strides) - 1} downsamplings",
                expected=f"1 <= deep_supr_num <= {len(strides) - 2}",
            )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[kernel_size] * len(strides),
            strides=[list(s) for s in per_axis],
            upsample_kernel_size=[list(s) for s in per_axis[1:]],
            filters=list(filters),
            norm_name=_NORM,
            act_name=_ACT,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=False,
        )
        self.divisible_by = tuple(math.prod(s[axis] for s in per_axis) for axis in range(spatial_dims))
        self.name = "unet2d" if spatial_dims == 2 else "unet"  # the registry name, for error messages

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:  # type: ignore[override]
        """Segment ``x``.

        Args:
            x: ``(B, C_in, D, H, W)`` with each axis a multiple of :attr:`divisible_by`.

        Returns:
            Logits ``(B, C_out, D, H, W)``; in training mode with deep supervision a list of such tensors, the
            full-resolution output first, then the auxiliary outputs (upsampled to full resolution) from the
            finest to the coarsest decoder level.

        Raises:
            ModelInputError: wrong rank, channel count, indivisible spatial size, or a 1-voxel bottleneck.
        """
        check_input(
            x,
            name=self.name,
            in_channels=self.in_channels,
            spatial_dims=self.spatial_dims,
            divisible_by=self.divisible_by,
        )
        bottleneck = tuple(s // k for s, k in zip(x.shape[2:], self.divisible_by, strict=True))
        if math.prod(bottleneck) == 1:
            raise ModelInputError(
                f"{self.name}: input spatial shape {tuple(x.shape[2:])} leaves a single bottleneck voxel {bottleneck}, "
                "and InstanceNorm needs more than one",
                expected=f"at least one axis twice its divisor {self.divisible_by}",
                hint="use a larger patch (sliding-window inference with the card's roi_size)",
            )
        out = super().forward(x)
        if self.training and self.deep_supervision:
            return list(torch.unbind(out, dim=1))
        return out


_CARD = ModelCard(
    name="unet",
    task="segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=2,
    roi_size=(128, 128, 128),
    divisible_by=(32, 32, 32),
    target_spacing=None,
    intensity_preset="ct",
    label_names=("background", "foreground"),
    paper="Isensee et al., nnU-Net, Nature Methods 2021 (arXiv:1809.10486); MONAI DynUNet",
    reference_params=31_189_410,  # exact count of the default configuration at 1 in / 2 out
    reference_config={"filters": _FILTERS, "strides": _STRIDES, "deep_supervision": False},
)


@register_model(_CARD, tiny={"filters": (4, 8, 16, 32), "strides": (1, 2, 2, 2)})
def unet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = _FILTERS,
    strides: Sequence[int | Sequence[int]] = _STRIDES,
    deep_supervision: bool = False,
    deep_supr_num: int = 3,
) -> UNet:
    """Build the nnU-Net-like :class:`UNet`; defaults are the 3d_fullres topology for a 128^3 patch.

    The returned module's ``divisible_by`` (product of the strides per axis) is copied into ``model.card`` by
    :func:`~medseg.models.registry.create_model`.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        filters: channels per stage.
        strides: stride per stage (first 1); ``len(strides) - 1`` downsamplings.
        deep_supervision: return auxiliary outputs in training mode.
        deep_supr_num: number of auxiliary outputs.
    """
    return UNet(
        in_channels,
        out_channels,
        filters=tuple(filters),
        strides=tuple(strides),
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
    )


_CARD_2D = ModelCard(
    name="unet2d",
    task="segmentation",
    spatial_dims=2,
    in_channels=1,
    out_channels=2,
    roi_size=(512, 512),
    divisible_by=(64, 64),
    target_spacing=None,
    intensity_preset="zscore",
    label_names=("background", "foreground"),
    paper="Isensee et al., nnU-Net (2d configuration), Nature Methods 2021 (arXiv:1809.10486); MONAI DynUNet",
    reference_params=33_460_322,  # exact count of the default configuration at 1 in / 2 out
    reference_config={"filters": _FILTERS_2D, "strides": _STRIDES_2D, "deep_supervision": False},
)


@register_model(_CARD_2D, tiny={"filters": (4, 8, 16, 32), "strides": (1, 2, 2, 2)})
def unet2d(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = _FILTERS_2D,
    strides: Sequence[int | Sequence[int]] = _STRIDES_2D,
    deep_supervision: bool = False,
    deep_supr_num: int = 3,
) -> UNet:
    """Build the 2D nnU-Net-like :class:`UNet` (``spatial_dims=2``); defaults are nnU-Net's ``2d`` topology for a
    512^2 patch (filters 32..512, 6 downsamplings, so both axes must be multiples of 64).

    Forward: ``(B, C_in, X, Y)`` -> logits ``(B, C_out, X, Y)``. Images and cines ``(C, X, Y, T)`` are segmented
    frame by frame by the :class:`~medseg.inference.predictor.Predictor` (windows of depth 1, see
    :mod:`medseg.inference.planar`).

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        filters: channels per stage.
        strides: stride per stage (first 1); ``len(strides) - 1`` downsamplings.
        deep_supervision: return auxiliary outputs in training mode.
        deep_supr_num: number of auxiliary outputs.
    """
    return UNet(
        in_channels,
        out_channels,
        filters=tuple(filters),
        strides=tuple(strides),
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        spatial_dims=2,
    )
