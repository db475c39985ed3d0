"""MedViTV2 as a 2D segmentation encoder, with a light FPN decoder of medseg's own.

Encoder: the MedViTV2 network of :mod:`medseg.models.medvit2` (Manzari et al., arXiv:2502.13693) without its
classifier; the outputs of the last block of each stage (strides 4 / 8 / 16 / 32, widths ``dims``) feed the decoder,
the deepest one through the network's final BatchNorm. Official classification checkpoints load into the encoder
with :func:`medseg.models.medvit2.load_medvit2_weights` (the classifier ``proj_head.*`` is dropped).

**The decoder is not from the paper**: MedViTV2 was published for classification only and its authors released no
segmentation head. This one is a plain feature pyramid (Lin et al., arXiv:1612.03144) with a summed semantic head
(as in Panoptic FPN, arXiv:1901.02446): per stage a 1x1 conv + BN + ReLU to ``decoder_dim`` channels, top-down
bilinear upsampling and addition, a 3x3 conv + BN + ReLU per level, bilinear upsampling of every level to stride 4
and summation, a 1x1 classifier, and bilinear upsampling to the input size.

Forward contract: ``(B, C_in, H, W)`` -> logits ``(B, C_out, H, W)`` (softmax classes, background first), H and W
multiples of 32 and at least 128 (the stage-3 7x7 neighbourhood attention, see
:func:`medseg.models.medvit2.min_input_size`); checked first with a ``ModelInputError`` naming the rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.card import ModelCard
from medseg.models.medvit2 import (
    DIVISOR,
    MEDVIT2_VARIANTS,
    PAPER,
    TINY,
    MedViT,
    MedViTConfig,
)
from medseg.models.medvit2 import _card as classifier_card
from medseg.models.registry import register_model

__all__ = ["FPNDecoder", "MedViTSeg"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FPNDecoder(nn.Module):
    """Feature-pyramid decoder: stage maps (finest first) -> logits at the size the caller names.

    Args:
        in_dims: widths of the stage maps, finest first.
        width: decoder width.
        out_channels: output classes.
    """

    def __init__(self, in_dims: Sequence[int], width: int, out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv_bn_relu(c, width, 1) for c in in_dims)
        self.smooth = nn.ModuleList(_conv_bn_relu(width, width, 3) for _ in in_dims)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``features[i]`` ``(B, in_dims[i], H_i, W_i)`` -> ``(B, out_channels, *size)``."""
        maps = [lateral(f) for lateral, f in zip(self.lateral, features, strict=True)]
        for i in range(len(maps) - 1, 0, -1):
            up = F.interpolate(maps[i], size=maps[i - 1].shape[-2:], mode="bilinear", align_corners=False)
            maps[i - 1] = maps[i - 1] + up
        grid = maps[0].shape[-2:]
        fused = self.smooth[0](maps[0])
        for smooth, m in zip(self.smooth[1:], maps[1:], strict=True):
            fused = fused + F.interpolate(smooth(m), size=grid, mode="bilinear", align_corners=False)
        return F.interpolate(self.classifier(fused), size=tuple(size), mode="bilinear", align_corners=False)


class MedViTSeg(nn.Module):
    """MedViTV2 encoder + FPN decoder for 2D segmentation.

    Args:
        config: encoder architecture (its ``num_classes`` is ignored: the encoder has no classifier).
        out_channels: segmentation classes ``C_out`` (background included).
        decoder_dim: width of the FPN decoder.
        name: registry name, used in error messages.

    Examples::

        >>> model = MedViTSeg(MedViTConfig(**MEDVIT2_VARIANTS["tiny"]), out_channels=3).eval()
        >>> model(torch.randn(1, 3, 128, 160)).shape
        torch.Size([1, 3, 128, 160])
    """

    divisible_by = (DIVISOR, DIVISOR)
    output = "softmax"

    def __init__(
        self, config: MedViTConfig | None = None, out_channels: int = 2, decoder_dim: int = 128, name: str = "medvit2"
    ) -> None:
        super().__init__()
        config = dataclasses.replace(config or MedViTConfig(), num_classes=0)
        self.encoder = MedViT(config, name=name)
        self.in_channels = config.in_channels
        self.out_channels = out_channels
        self.min_size = self.encoder.min_size
        self.decoder = FPNDecoder(config.dims, decoder_dim, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> logits ``(B, C_out, H, W)``."""
        features = self.encoder.forward_features(x)  # checks the input first
        features[-1] = self.encoder.norm(features[-1])
        return self.decoder(features, x.shape[-2:])


# -- registry ---------------------------------------------------------------------------------------------------------

#: Parameter counts of the registered defaults (3 in, 2 classes, decoder width 128), measured.
SEG_REFERENCE_PARAMS = {"tiny": 12_025_279, "small": 30_289_305, "base": 67_003_021, "large": 118_100_271}
SEG_TINY = {**TINY, "decoder_dim": 16}


def _card(variant: str) -> ModelCard:
    return classifier_card(variant).replace(
        name=f"medvit2_seg_{variant}",
        task="segmentation",
        label_names=("background", "foreground"),
        paper=f"{PAPER} (encoder; the FPN decoder is medseg's own, not from the paper)",
        reference_params=SEG_REFERENCE_PARAMS[variant],
        reference_config={},
    )


def build_medvit_seg(variant: str, in_channels: int, out_channels: int, decoder_dim: int, **kwargs: Any) -> MedViTSeg:
    """A MedViTV2-``variant`` encoder with an FPN decoder; ``kwargs`` override :class:`MedViTConfig` fields."""
    config = MedViTConfig.from_kwargs(**{**MEDVIT2_VARIANTS[variant], **kwargs, "in_channels": in_channels})
    return MedViTSeg(config, out_channels=out_channels, decoder_dim=decoder_dim, name=f"medvit2_seg_{variant}")


@register_model(_card("tiny"), tiny=SEG_TINY)
def medvit2_seg_tiny(in_channels: int = 3, out_channels: int = 2, decoder_dim: int = 128, **kwargs: Any) -> MedViTSeg:
    """MedViTV2-T encoder + FPN decoder; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit_seg("tiny", in_channels, out_channels, decoder_dim, **kwargs)


@register_model(_card("small"), tiny=SEG_TINY)
def medvit2_seg_small(in_channels: int = 3, out_channels: int = 2, decoder_dim: int = 128, **kwargs: Any) -> MedViTSeg:
    """MedViTV2-S encoder + FPN decoder; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit_seg("small", in_channels, out_channels, decoder_dim, **kwargs)


@register_model(_card("base"), tiny=SEG_TINY)
def medvit2_seg_base(in_channels: int = 3, out_channels: int = 2, decoder_dim: int = 128, **kwargs: Any) -> MedViTSeg:
    """MedViTV2-B encoder + FPN decoder; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit_seg("base", in_channels, out_channels, decoder_dim, **kwargs)


@register_model(_card("large"), tiny=SEG_TINY)
def medvit2_seg_large(in_channels: int = 3, out_channels: int = 2, decoder_dim: int = 128, **kwargs: Any) -> MedViTSeg:
    """MedViTV2-L encoder + FPN decoder; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit_seg("large", in_channels, out_channels, decoder_dim, **kwargs)
