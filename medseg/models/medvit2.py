"""MedViTV2: a hybrid convolution / neighbourhood-attention / KAN vision transformer for medical image classification.

Paper: O. N. Manzari, S. Asgariandehkordi, T. Koleilat, Y. Xiao, H. Rivaz, "MedViT V2: Medical Image Classification
with KAN-Integrated Transformers and Dilated Neighborhood Attention", Applied Soft Computing 2025, arXiv:2502.13693.
Written from the paper and the facts in ``docs/models/medvit2.md``; the official code (``Omid-Nejati/MedViTV2``,
MIT licence) was read, not copied. State-dict key names equal the official ones, so its checkpoints load with
``strict=True`` through :func:`load_medvit2_weights`.

Faithful to the released code:
    * Stem: four Conv 3x3 (pad 1, no bias) + BatchNorm + ReLU, ``in -> 64`` (stride 2), ``64 -> 32``, ``32 -> 64``,
      ``64 -> 64`` (stride 2): stride 4.
    * Four stages with strides 4 / 8 / 16 / 32. Block types: stage 1 ``[LFP] * d1``; stage 2 ``[LFP] * (d2 - 1) +
      [GFP]``; stage 3 ``[LFP, LFP, GFP] * (d3 / 3)``; stage 4 ``[GFP] * d4``. The first block of stages 2-4 has
      stride 2 via its patch embedding (AvgPool 2x2 ceil mode, padding excluded -> 1x1 conv, no bias -> BatchNorm;
      1x1 conv + BatchNorm alone when only the width changes; identity otherwise).
    * LFP (local feature perception): ``x = x + DropPath(NA(BN(x)))`` with 2D neighbourhood attention (kernel 7,
      dilation 1, heads ``C / 32``, qkv bias, relative-position bias) applied to ``x.reshape(B, H, W, C)`` of the
      NCHW tensor and reshaped back with ``.reshape(B, C, H, W)``: **raw reshapes, not permutes**, exactly as the
      released weights were trained. Then ``x = x + LFF(BN(x))`` where the locality feed-forward returns its input
      plus a branch: 1x1 conv ``C -> 3C`` + BN + h-swish, depthwise conv (7x7 in stage 1, 3x3 later) + BN + h-swish,
      squeeze-excitation (``3C -> 3 -> 3C``, h-sigmoid), 1x1 conv ``3C -> C`` + BN.
    * GFP (global feature perception): ``C_sa = make_divisible(0.75 C, 32)``, ``C_ca = C - C_sa``. Patch embedding
      to ``C_sa``; ``x + DropPath(E-MHSA(BN(x)))`` whose keys / values are average-pooled over the flattened token
      sequence (kernel = stride = ``sr^2``, sr 8 / 4 / 2 / 1 per stage) and BatchNorm1d'd; a projection to
      ``C_ca`` plus multi-head convolutional attention (grouped 3x3 conv, groups ``C_ca / 32``, BN, ReLU, 1x1 conv);
      concat to ``C``; ``x + DropPath(KAN(BN(x).reshape(-1, C)).reshape(B, C, H, W))`` (raw reshape again) with a
      FasterKAN ``[C, 2C, C]`` (:mod:`medseg.models.layers.fasterkan`). The block also builds a locality
      feed-forward ``conv`` that its forward never calls: it is kept (frozen, ``requires_grad=False``) because the
      released checkpoints hold its weights.
    * Head: BatchNorm -> global average pool -> Linear (``proj_head.0``). Stochastic depth rises linearly from 0
      over all blocks (GFP scales it by 0.75 for E-MHSA and 0.25 for MHCA). Init: every Conv2d / Linear weight
      trunc-normal(0.02) with zero bias (this overrides the KAN's Xavier init, as the released code does), norms
      1 / 0, the relative-position bias trunc-normal(0.02).

Deviations and why:
    * **Neighbourhood attention in plain PyTorch** (:mod:`medseg.models.layers.neighborhood_attention`) instead of
      NATTEN 0.17, which does not build against current torch (and NATTEN >= 0.20 dropped the relative-position
      bias). Same rule (windows shift inward at the borders), same parameters. The paper calls the attention
      "dilated"; the released code passes no dilation, so it is plain neighbourhood attention, as here.
    * **Non-square inputs**: the KAN reshape uses ``(B, C, H, W)`` where the released code assumes square maps
      (``(B, C, t, t)``); identical on square inputs.
    * ``make_divisible`` rounds to ``head_dim`` (32 in every released variant, where this changes nothing) so small
      test variants with a smaller head width stay consistent; ``in_channels`` may differ from 3.
    * Input contract (checked first, :func:`medseg.models.checks.check_input`): ``(B, C_in, H, W)`` with H and W
      multiples of 32 and at least :func:`min_input_size` (128 for every released variant: the stage-3 LFP blocks
      run 7x7 neighbourhood attention at stride 16, and 7 x 16 = 112 rounds up to 128). The paper trains at 224.
    * BatchNorm merging for deployment (``merge_bn``) and ONNX-export branches of the released code are left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from monai.networks.layers import DropPath
from torch import Tensor, nn

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models.card import ModelCard
from medseg.models.checkpoint import load_state_dict_checked, read_weights_file
from medseg.models.checks import check_input
from medseg.models.layers.fasterkan import FasterKAN
from medseg.models.layers.neighborhood_attention import NeighborhoodAttention2D
from medseg.models.registry import register_model

__all__ = [
    "GFP",
    "LFP",
    "MEDVIT2_VARIANTS",
    "PAPER",
    "LocalityFeedForward",
    "MedViT",
    "MedViTConfig",
    "load_medvit2_weights",
    "min_input_size",
]

logger = logging.getLogger(__name__)

PAPER = (
    "Manzari et al., MedViT V2: Medical Image Classification with KAN-Integrated Transformers and Dilated "
    "Neighborhood Attention, Applied Soft Computing 2025, arXiv:2502.13693"
)
NORM_EPS = 1e-5
DIVISOR = 32  # total stride of the encoder
STAGE_STRIDES = (4, 8, 16, 32)
#: Preset name of the input normalisation the released weights expect: RGB in [0, 1], then (x - 0.5) / 0.5.
INTENSITY_PRESET = "rgb_mean05_std05"


@dataclass(frozen=True)
class MedViTConfig:
    """Architecture of a MedViTV2 network (the defaults are ``MedViT_small``).

    Attributes:
        in_channels: input channels (3 for the released weights).
        num_classes: classifier outputs; 0 builds no classifier (``proj_head``), e.g. for an encoder.
        stem_chs: widths of the stem convolutions.
        depths: blocks per stage; ``depths[2]`` a multiple of 3.
        dims: widths of the stages, multiples of ``head_dim``.
        drop_path_rate: largest stochastic-depth rate (the last block's).
        attn_drop: dropout on attention weights (E-MHSA).
        drop: dropout on neighbourhood-attention weights and after the E-MHSA projection.
        sr_ratios: sequence-reduction ratio of E-MHSA per stage.
        head_dim: channels per attention head (and per MHCA group).
        mix_block_ratio: share of a GFP block's width given to E-MHSA.
        na_kernel: neighbourhood-attention window (odd).
        grad_checkpointing: recompute every block in the backward pass to save memory.
    """

    in_channels: int = 3
    num_classes: int = 1000
    stem_chs: tuple[int, int, int] = (64, 32, 64)
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    dims: tuple[int, int, int, int] = (64, 128, 256, 512)
    drop_path_rate: float = 0.1
    attn_drop: float = 0.0
    drop: float = 0.0
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75
    na_kernel: int = 7
    grad_checkpointing: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MedViTConfig:
        """Build from keyword arguments (sequences become tuples), refusing unknown names with ``ConfigError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown MedViTV2 options {unknown}", expected=f"some of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in kwargs.items()})


#: Released variants (``MedViT_tiny`` ... ``MedViT_large``): depths, dims and stochastic depth.
MEDVIT2_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"depths": (2, 2, 6, 1), "dims": (64, 128, 192, 384), "drop_path_rate": 0.1},
    "small": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512), "drop_path_rate": 0.1},
    "base": {"depths": (2, 2, 6, 2), "dims": (96, 192, 384, 768), "drop_path_rate": 0.2},
    "large": {"depths": (2, 2, 6, 2), "dims": (96, 256, 512, 1024), "drop_path_rate": 0.2},
}


def _make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never below 90 % of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _gfp_split(channels: int, config: MedViTConfig) -> tuple[int, int]:
    """``(C_sa, C_ca)``: widths of the E-MHSA and MHCA parts of a GFP block of ``channels``."""
    c_sa = _make_divisible(int(channels * config.mix_block_ratio), config.head_dim)
    return c_sa, channels - c_sa


def _block_types(depths: Sequence[int]) -> list[list[str]]:
    return [
        ["LFP"] * depths[0],
        ["LFP"] * (depths[1] - 1) + ["GFP"],
        ["LFP", "LFP", "GFP"] * (depths[2] // 3),
        ["GFP"] * depths[3],
    ]


def min_input_size(config: MedViTConfig) -> int:
    """Smallest side (a multiple of 32) whose feature maps fit every block of ``config``.

    Every LFP map must hold the ``na_kernel`` window (NATTEN refuses smaller maps) and every E-MHSA token sequence at
    least one pooling window of ``sr^2`` tokens. On a side ``S`` that is a multiple of 32, stage ``i`` runs at
    ``S / stride_i``.
    """
    need = 1
    for stage, types in enumerate(_block_types(config.depths)):
        stride = STAGE_STRIDES[stage]
        if "LFP" in types:
            need = max(need, config.na_kernel * stride)
        if "GFP" in types:
            need = max(need, config.sr_ratios[stage] * stride)
    return DIVISOR * max(1, math.ceil(need / DIVISOR))


def _check_config(config: MedViTConfig) -> None:
    def bad(what: str, expected: str) -> ConfigError:
        return ConfigError(f"MedViTV2: {what}", expected=expected, hint="see MEDVIT2_VARIANTS for the released shapes")

    if len(config.depths) != 4 or len(config.dims) != 4 or len(config.sr_ratios) != 4 or len(config.stem_chs) != 3:
        raise bad(
            f"depths {config.depths}, dims {config.dims}, sr_ratios {config.sr_ratios}", "4 stages, 3 stem widths"
        )
    d1, d2, d3, d4 = config.depths
    if d1 < 1 or d2 < 1 or d4 < 1 or d3 < 3 or d3 % 3:
        raise bad(f"depths {config.depths}", "depths[0], depths[1], depths[3] >= 1 and depths[2] a multiple of 3")
    if config.head_dim < 1 or any(c % config.head_dim for c in config.dims):
        raise bad(f"dims {config.dims} with head_dim {config.head_dim}", "every width a multiple of head_dim")
    if config.na_kernel < 1 or config.na_kernel % 2 == 0:
        raise bad(f"na_kernel {config.na_kernel}", "an odd window size such as 7")
    for channels in config.dims[1:]:
        c_sa, c_ca = _gfp_split(channels, config)
        if c_ca <= 0 or c_ca % config.head_dim:
            raise bad(
                f"a GFP block of width {channels} splits into {c_sa} + {c_ca} channels",
                f"a non-empty MHCA part that is a multiple of head_dim {config.head_dim}",
            )
    if config.in_channels < 1 or config.num_classes < 0:
        raise bad(f"in_channels {config.in_channels}, num_classes {config.num_classes}", "in >= 1, classes >= 0")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=NORM_EPS)


class _ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class _PatchEmbed(nn.Module):
    """Stride-2 average pool and / or 1x1 conv + BN to change the width; identity when neither is needed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.avgpool: nn.Module = nn.Identity()
        self.conv: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        if stride == 2:
            self.avgpool = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)
        if stride == 2 or in_channels != out_channels:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            self.norm = _bn(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.avgpool(x)))


class _HSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + 3) / 6


class _HSwish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sigmoid = _HSigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(x)


class _SELayer(nn.Module):
    """Squeeze-excitation ``C -> C / reduction -> C`` with an h-sigmoid gate."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), _HSigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class LocalityFeedForward(nn.Module):
    """``x + branch(x)``: 1x1 expand + BN + h-swish, depthwise ``k x k`` + BN + h-swish, SE, 1x1 project + BN.

    Args:
        channels: input and output width ``C``.
        kernel_size: depthwise kernel.
        expand_ratio: hidden width ``int(C * expand_ratio)``.
        reduction: SE reduction (the released blocks use ``C``, i.e. an SE bottleneck of ``expand_ratio`` units).
    """

    def __init__(self, channels: int, kernel_size: int, expand_ratio: float, reduction: int) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        # Indices 0..8 are the released key names (conv.0, conv.1, conv.3, conv.4, conv.6.fc.*, conv.7, conv.8).
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            _HSwish(),
            nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            _HSwish(),
            _SELayer(hidden, reduction=reduction),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return x + self.conv(x)


class _MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 conv (one group per head) + BN + ReLU + 1x1 conv."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels // head_dim, bias=False)
        self.norm = _bn(channels)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class EMHSA(nn.Module):
    """Efficient multi-head self-attention: keys / values from the token sequence average-pooled ``sr^2`` times.

    Args:
        dim: token width ``C``.
        head_dim: channels per head.
        sr_ratio: the sequence is pooled with kernel = stride = ``sr_ratio ** 2`` (and BatchNorm1d'd) when > 1.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.AvgPool1d(kernel_size=sr_ratio**2, stride=sr_ratio**2)
            self.norm = nn.BatchNorm1d(dim, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` -> ``(B, N, C)``."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        k = self.k(kv).reshape(b, -1, heads, c // heads).transpose(1, 2)
        v = self.v(kv).reshape(b, -1, heads, c // heads).transpose(1, 2)
        attn = self.attn_drop(((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class LFP(nn.Module):
    """Local feature perception block: neighbourhood attention + locality feed-forward, ``(B, C_in, H, W)`` ->
    ``(B, C, H / stride, W / stride)``."""

    def __init__(
        self, in_channels: int, channels: int, stride: int, kernel_size: int, drop_path: float, config: MedViTConfig
    ) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(in_channels, channels, stride)
        self.norm1 = _bn(channels)
        self.attn = NeighborhoodAttention2D(
            channels,
            num_heads=channels // config.head_dim,
            kernel_size=config.na_kernel,
            qkv_bias=True,
            rel_pos_bias=True,
            attn_drop=config.drop,
        )
        self.attention_path_dropout = DropPath(drop_path)
        self.conv = LocalityFeedForward(channels, kernel_size, expand_ratio=3, reduction=channels)
        self.norm2 = _bn(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        # Raw reshapes (not permutes) between NCHW and the attention's (B, H, W, C): the released weights expect it.
        attn = self.attn(self.norm1(x).reshape(b, h, w, c)).reshape(b, c, h, w)
        x = x + self.attention_path_dropout(attn)
        return x + self.conv(self.norm2(x))


class GFP(nn.Module):
    """Global feature perception block: E-MHSA and MHCA side by side, then a KAN feed-forward."""

    def __init__(
        self, in_channels: int, channels: int, stride: int, sr_ratio: int, drop_path: float, config: MedViTConfig
    ) -> None:
        super().__init__()
        c_sa, c_ca = _gfp_split(channels, config)
        ratio = config.mix_block_ratio
        self.patch_embed = _PatchEmbed(in_channels, c_sa, stride)
        self.norm1 = _bn(c_sa)
        self.e_mhsa = EMHSA(c_sa, config.head_dim, sr_ratio, attn_drop=config.attn_drop, proj_drop=config.drop)
        self.mhsa_path_dropout = DropPath(drop_path * ratio)
        self.projection = _PatchEmbed(c_sa, c_ca, stride=1)
        self.mhca = _MHCA(c_ca, config.head_dim)
        self.mhca_path_dropout = DropPath(drop_path * (1 - ratio))
        self.norm2 = _bn(channels)
        # Built but never called by the released forward; kept frozen so released checkpoints load strictly.
        self.conv = LocalityFeedForward(channels, 3, expand_ratio=2, reduction=channels)
        self.conv.requires_grad_(False)
        self.mlp_path_dropout = DropPath(drop_path)
        self.kan = FasterKAN([channels, int(channels * 2), channels])

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        out = self.e_mhsa(self.norm1(x).flatten(2).transpose(1, 2))  # (B, H*W, C_sa)
        x = x + self.mhsa_path_dropout(out).transpose(1, 2).reshape(b, c, h, w)
        out = self.projection(x)
        x = torch.cat([x, out + self.mhca_path_dropout(self.mhca(out))], dim=1)
        out = self.norm2(x)
        d = out.shape[1]
        # Raw reshape: every row of the KAN input is d consecutive values of the NCHW buffer, as in the release.
        return x + self.mlp_path_dropout(self.kan(out.reshape(-1, d)).reshape(b, d, h, w))


class MedViT(nn.Module):
    """MedViTV2 classifier (or encoder, with ``num_classes=0``).

    Args:
        config: the architecture (:class:`MedViTConfig`).
        name: the registry name, used in error messages.

    Input ``(B, C_in, H, W)`` with H, W multiples of 32 and at least :attr:`min_size`; output logits
    ``(B, num_classes)``. :meth:`forward_features` gives the four stage maps for dense heads.

    Examples::

        >>> model = MedViT(MedViTConfig(num_classes=9, **MEDVIT2_VARIANTS["tiny"])).eval()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 9])
    """

    divisible_by = (DIVISOR, DIVISOR)

    def __init__(self, config: MedViTConfig | None = None, name: str = "medvit2") -> None:
        super().__init__()
        config = config or MedViTConfig()
        _check_config(config)
        self.config = config
        self.name = name
        self.in_channels = config.in_channels
        self.out_channels = config.num_classes
        self.min_size = (min_input_size(config),) * 2
        s0, s1, s2 = config.stem_chs
        self.stem = nn.Sequential(
            _ConvBNReLU(config.in_channels, s0, stride=2),
            _ConvBNReLU(s0, s1, stride=1),
            _ConvBNReLU(s1, s2, stride=1),
            _ConvBNReLU(s2, s2, stride=2),
        )
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # torch.linspace(0, p, total)
        blocks: list[nn.Module] = []
        channels = s2
        for stage, types in enumerate(_block_types(config.depths)):
            width = config.dims[stage]
            for i, kind in enumerate(types):
                stride = 2 if stage > 0 and i == 0 else 1
                rate = rates[len(blocks)]
                if kind == "LFP":
                    kernel = 7 if stage == 0 else 3
                    blocks.append(LFP(channels, width, stride, kernel, rate, config))
                else:
                    blocks.append(GFP(channels, width, stride, config.sr_ratios[stage], rate, config))
                channels = width
        self.features = nn.Sequential(*blocks)
        self.stage_out_idx = [sum(config.depths[: i + 1]) - 1 for i in range(4)]
        self.norm = _bn(channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.proj_head: nn.Sequential | None = None
        if config.num_classes > 0:
            self.proj_head = nn.Sequential(nn.Linear(channels, config.num_classes))
        self.apply(_init_weights)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ModelInputError`` unless ``x`` is ``(B, C_in, H, W)``, H and W multiples of 32 and >= min_size."""
        check_input(x, name=self.name, in_channels=self.in_channels, spatial_dims=2, divisible_by=self.divisible_by)
        h, w = x.shape[-2:]
        low = self.min_size[0]
        if h < low or w < low:
            raise ModelInputError(
                f"{self.name}: input {h}x{w} is smaller than the network's minimum {low}x{low}",
                expected=f"H and W >= {low}: the {self.config.na_kernel}x{self.config.na_kernel} neighbourhood "
                f"attention needs feature maps of at least that size at every LFP stage",
                hint=f"pad or resize the image to at least {low}x{low} (the paper uses 224x224)",
            )

    def _run(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs ``(B, dims[i], H / s, W / s)`` for strides ``s`` = 4, 8, 16, 32 (no final norm)."""
        self.check_input(x)
        x = self.stem(x)
        outs = []
        for i, block in enumerate(self.features):
            x = self._run(block, x)
            if i in self.stage_out_idx:
                outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> logits ``(B, num_classes)`` (pooled, normalised features when ``num_classes=0``)."""
        feats = self.norm(self.forward_features(x)[-1])
        pooled = torch.flatten(self.avgpool(feats), 1)
        return pooled if self.proj_head is None else self.proj_head(pooled)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


HEAD_PREFIX = "proj_head."


def load_medvit2_weights(model: nn.Module, path: str | Path, *, sha256: str | None = None) -> list[str]:
    """Load a local official (or medseg) MedViTV2 checkpoint into ``model``.

    Accepts a bare state dict or one under ``"model"`` / ``"state_dict"`` (the official training script saves
    ``{"model": ...}``). As in the official fine-tuning, the classifier ``proj_head.*`` is dropped when its shape
    differs from the model's (another class count) or the model has none (an encoder); the model keeps its own
    freshly initialised head. Every other key must match exactly. A model with an ``encoder`` attribute (the
    segmentation variants) loads the checkpoint into its encoder.

    Args:
        model: a :class:`MedViT`, or a module whose ``encoder`` is one.
        path: the local weights file.
        sha256: expected hex digest of the file.

    Returns:
        The checkpoint keys that were dropped (the classifier, or nothing).

    Raises:
        WeightsError: unreadable file, or missing / unexpected / mis-shaped keys outside the classifier (listed).
    """
    target = model if isinstance(model, MedViT) else getattr(model, "encoder", None)
    if not isinstance(target, MedViT):
        raise WeightsError(
            f"load_medvit2_weights got a {type(model).__name__}",
            expected="a MedViT, or a model whose encoder is one (medvit2_* / medvit2_seg_*)",
        )
    state = read_weights_file(
        path,
        kind="MedViTV2",
        sha256=sha256,
        containers=("model", "state_dict"),
        hint="use a MedViTV2 checkpoint from the official release (MedViT_tiny ... MedViT_large) or a medseg run",
    )
    own = target.state_dict()
    dropped = [
        k
        for k, v in state.items()
        if k.startswith(HEAD_PREFIX) and (k not in own or tuple(own[k].shape) != tuple(v.shape))
    ]
    if dropped:
        logger.info("MedViTV2 weights %s: classifier %s dropped (class count differs)", path, dropped)
    kept = {k: v for k, v in state.items() if k not in dropped}
    if dropped:  # the model's own freshly initialised classifier replaces the dropped one
        kept |= {k: v for k, v in own.items() if k.startswith(HEAD_PREFIX)}
    load_state_dict_checked(target, kept, source=str(path))
    return dropped


# -- registry ---------------------------------------------------------------------------------------------------------

#: Parameter counts at 3 in / 1000 classes (measured; the released configurations).
REFERENCE_PARAMS = {"tiny": 11_719_845, "small": 30_087_295, "base": 66_995_571, "large": 118_291_477}
MIN_SIZE = min_input_size(MedViTConfig())
#: Keyword overrides of the small test variants (same structure, narrow widths).
TINY = {"stem_chs": (16, 8, 16), "depths": (1, 2, 3, 1), "dims": (16, 32, 48, 64), "head_dim": 8}


def _card(variant: str) -> ModelCard:
    return ModelCard(
        name=f"medvit2_{variant}",
        task="classification",
        spatial_dims=2,
        in_channels=3,
        out_channels=2,
        roi_size=(224, 224),
        divisible_by=(DIVISOR, DIVISOR),
        target_spacing=None,
        intensity_preset=INTENSITY_PRESET,
        label_names=("label_0", "label_1"),
        paper=PAPER,
        reference_params=REFERENCE_PARAMS[variant],
        reference_config={"out_channels": 1000},
        min_size=(MIN_SIZE, MIN_SIZE),
    )


def build_medvit(variant: str, in_channels: int, out_channels: int, **kwargs: Any) -> MedViT:
    """A MedViTV2 classifier of ``variant`` (``tiny`` ... ``large``) with ``kwargs`` overriding the config."""
    config = MedViTConfig.from_kwargs(
        **{**MEDVIT2_VARIANTS[variant], **kwargs, "in_channels": in_channels, "num_classes": out_channels}
    )
    return MedViT(config, name=f"medvit2_{variant}")


@register_model(_card("tiny"), tiny=TINY)
def medvit2_tiny(in_channels: int = 3, out_channels: int = 2, **kwargs: Any) -> MedViT:
    """MedViTV2-T: depths 2 / 2 / 6 / 1, widths 64 / 128 / 192 / 384; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit("tiny", in_channels, out_channels, **kwargs)


@register_model(_card("small"), tiny=TINY)
def medvit2_small(in_channels: int = 3, out_channels: int = 2, **kwargs: Any) -> MedViT:
    """MedViTV2-S: depths 2 / 2 / 6 / 2, widths 64 / 128 / 256 / 512; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit("small", in_channels, out_channels, **kwargs)


@register_model(_card("base"), tiny=TINY)
def medvit2_base(in_channels: int = 3, out_channels: int = 2, **kwargs: Any) -> MedViT:
    """MedViTV2-B: depths 2 / 2 / 6 / 2, widths 96 / 192 / 384 / 768; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit("base", in_channels, out_channels, **kwargs)


@register_model(_card("large"), tiny=TINY)
def medvit2_large(in_channels: int = 3, out_channels: int = 2, **kwargs: Any) -> MedViT:
    """MedViTV2-L: depths 2 / 2 / 6 / 2, widths 96 / 256 / 512 / 1024; ``kwargs`` are :class:`MedViTConfig` fields."""
    return build_medvit("large", in_channels, out_channels, **kwargs)
