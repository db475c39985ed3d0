"""Trainable parts of DB-SAM's dual-branch adapter (arXiv:2410.04172): channel attention, convolution branch,
bilateral deformable cross-attention and the ViT-convolution fusion gate.

Token tensors are ``(B, L, C)`` with the levels of a multi-scale map flattened row-major and concatenated; every
function that needs the 2D layout takes the ``(H, W)`` of each level. See :mod:`medseg.models.db_sam` for how the
parts are wired and which choices are reconstructions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn

from medseg.models.layers.ms_deform_attn import MSDeformAttn, deform_inputs, reference_points
from medseg.models.layers.sam_encoder import LayerNorm2d

__all__ = [
    "BilateralCrossAttention",
    "ChannelAttentionBlock",
    "ConvBranch",
    "DeformCrossAttnBlock",
    "FusionGate",
    "MixFFN",
    "SqueezeExcite",
    "split_levels",
]

Shapes = Sequence[tuple[int, int]]


def split_levels(tokens: Tensor, shapes: Shapes) -> list[Tensor]:
    """``(B, sum H*W, C)`` tokens -> one ``(B, C, H, W)`` map per level."""
    b, _, c = tokens.shape
    parts = tokens.split([h * w for h, w in shapes], dim=1)
    return [p.transpose(1, 2).reshape(b, c, h, w) for p, (h, w) in zip(parts, shapes, strict=True)]


def _flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """One ``(B, C, H, W)`` map per level -> ``(B, sum H*W, C)`` tokens."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (arXiv:1709.01507): global average pool -> 1x1 conv -> GELU -> 1x1 conv -> sigmoid gate.

    Args:
        channels: ``C`` of the ``(B, C, H, W)`` input.
        reduction: hidden width as a fraction of ``C`` (0.25 in DB-SAM).
        bias: whether the two 1x1 convolutions have a bias (not in DB-SAM).
    """

    def __init__(self, channels: int, reduction: float = 0.25, bias: bool = False) -> None:
        super().__init__()
        hidden = max(1, round(channels * reduction))
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` rescaled per channel."""
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class ChannelAttentionBlock(nn.Module):
    """DB-SAM's channel-attention block (CAB), an MBConv-style residual block without bias (arXiv:1801.04381).

    ``x + PW(SE(GELU(DW3x3(LN(x)))))``: LayerNorm2d, depthwise 3x3 conv, GELU, squeeze-excite (reduction 0.25),
    pointwise 1x1 conv. 893,184 parameters at ``dim=768``.

    Args:
        dim: channel width ``C``.
        reduction: squeeze-excite hidden fraction.
    """

    def __init__(self, dim: int, reduction: float = 0.25) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = SqueezeExcite(dim, reduction, bias=False)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return x + self.conv_pw(self.se(self.act(self.conv_dw(self.norm(x)))))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ConvBranch(nn.Module):
    """The light convolution branch: the image at a quarter of the model's side -> three shallow feature levels.

    The input ``(B, 3, S, S)`` is resized (bilinear, antialiased) to ``S/4`` (256 for ``S = 1024``), then a stem of
    three 3x3 conv-BN-ReLU (the first with stride 2) and a 3x3 max-pool gives stride 4 (``S/16``, the ViT token grid);
    two more stride-2 conv-BN-ReLU give ``S/32`` and ``S/64``. Widths ``c, 2c, 4c``. Each level is projected to the
    ViT width by a 1x1 conv and LayerNorm2d, and a learnable level embedding is added (the spatial prior module of
    ViT-Adapter, arXiv:2205.08534, applied to the low-resolution image).

    Args:
        embed_dim: ViT width ``C``.
        channels: stem width ``c``.
        input_size: side the image is resized to before the stem.
    """

    n_levels = 3

    def __init__(self, embed_dim: int, channels: int = 64, input_size: int = 256) -> None:
        super().__init__()
        self.input_size = input_size
        self.stem = nn.Sequential(
            _conv_bn_relu(3, channels, stride=2),
            _conv_bn_relu(channels, channels),
            _conv_bn_relu(channels, channels),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.down1 = _conv_bn_relu(channels, 2 * channels, stride=2)
        self.down2 = _conv_bn_relu(2 * channels, 4 * channels, stride=2)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, embed_dim, 1), LayerNorm2d(embed_dim))
            for c in (channels, 2 * channels, 4 * channels)
        )
        self.level_embed = nn.Parameter(torch.zeros(self.n_levels, embed_dim))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, S, S)`` -> ``[(B, C, S/16, S/16), (B, C, S/32, S/32), (B, C, S/64, S/64)]``."""
        x = F.interpolate(
            x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
        )
        c1 = self.stem(x)
        c2 = self.down1(c1)
        c3 = self.down2(c2)
        levels = zip(self.proj, (c1, c2, c3), self.level_embed, strict=True)
        return [proj(c) + emb[None, :, None, None] for proj, c, emb in levels]


class MixFFN(nn.Module):
    """Mix-FFN on multi-level tokens: Linear(C, hC) -> depthwise 3x3 conv per level -> GELU -> Linear(hC, C).

    The depthwise convolution (with bias) runs on each level's 2D map separately (SegFormer, arXiv:2105.15203;
    ViT-Adapter's ConvFFN, arXiv:2205.08534).

    Args:
        dim: token width ``C``.
        hidden: hidden width ``hC``.
        drop: dropout after the activation and after the output projection.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        """``(B, sum H*W, C)`` tokens on levels ``shapes`` -> ``(B, sum H*W, C)``."""
        x = _flatten_levels([self.dwconv(m) for m in split_levels(self.fc1(x), shapes)])
        return self.drop(self.fc2(self.drop(self.act(x))))


class DeformCrossAttnBlock(nn.Module):
    """Query tokens attend to multi-level value tokens with multi-scale deformable attention, then an FFN.

    ``x = q + MSDeformAttn(LN(q), ref, LN(v))``; ``x = x + MixFFN(LN(x))``. Reference points are the pixel centres of
    the query levels (:func:`~medseg.models.layers.ms_deform_attn.reference_points`).

    Args:
        dim: token width ``C``.
        n_levels: number of value levels.
        n_heads: deformable-attention heads.
        n_points: sampling points per head and level.
        ffn_ratio: FFN hidden width as a multiple of ``C``.
        drop: dropout on the attention output and inside the FFN.
        drop_path: stochastic depth of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        n_levels: int,
        n_heads: int,
        n_points: int = 4,
        ffn_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.value_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.attn_drop = nn.Dropout(drop)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, int(dim * ffn_ratio), drop)
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: Tensor, query_shapes: Shapes, value: Tensor, value_shapes: Shapes) -> Tensor:
        """``query`` ``(B, Lq, C)`` on levels ``query_shapes``, ``value`` ``(B, Lv, C)`` on ``value_shapes``.

        Returns:
            ``(B, Lq, C)``.
        """
        ref = reference_points(query_shapes, len(value_shapes), batch=query.shape[0], device=query.device)
        spatial_shapes, level_start = deform_inputs(value_shapes, device=query.device)
        attn = self.attn(
            self.query_norm(query), ref.to(query.dtype), self.value_norm(value), spatial_shapes, level_start
        )
        x = query + self.drop_path(self.attn_drop(attn))
        return x + self.drop_path(self.ffn(self.ffn_norm(x), query_shapes))


class BilateralCrossAttention(nn.Module):
    """The bilateral interaction after a ViT stage: ViT tokens query the conv levels, then conv tokens query the ViT.

    Args:
        dim: token width ``C``.
        conv_levels: number of convolution-branch levels.
        n_heads: deformable-attention heads.
        n_points: sampling points per head and level.
        ffn_ratio: FFN hidden width as a multiple of ``C``.
        drop: dropout.
        drop_path: stochastic depth.
    """

    def __init__(
        self,
        dim: int,
        conv_levels: int,
        n_heads: int,
        n_points: int = 4,
        ffn_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.vit_from_conv = DeformCrossAttnBlock(dim, conv_levels, n_heads, n_points, ffn_ratio, drop, drop_path)
        self.conv_from_vit = DeformCrossAttnBlock(dim, 1, n_heads, n_points, ffn_ratio, drop, drop_path)

    def forward(self, vit: Tensor, conv: Tensor, conv_shapes: Shapes) -> tuple[Tensor, Tensor]:
        """Update both branches.

        Args:
            vit: ViT tokens ``(B, h, w, C)``.
            conv: conv tokens ``(B, sum H_l * W_l, C)`` on levels ``conv_shapes``.
            conv_shapes: ``(H_l, W_l)`` of the conv levels.

        Returns:
            ``(vit (B, h, w, C), conv (B, sum H_l * W_l, C))``.
        """
        b, h, w, c = vit.shape
        vit_shape = [(h, w)]
        tokens = self.vit_from_conv(vit.reshape(b, h * w, c), vit_shape, conv, conv_shapes)
        conv = self.conv_from_vit(conv, conv_shapes, tokens, vit_shape)
        return tokens.view(b, h, w, c), conv


class FusionGate(nn.Module):
    """ViT-convolution fusion: ``M = sigmoid(MLP_d(F_d) + MLP_s(F_s))``, ``out = F_d * M + F_s * (1 - M)``.

    Each MLP is Linear(C, C/r) -> GELU -> Linear(C/r, C) applied per token, so the gate varies over positions and
    channels (DB-SAM Fig. 1).

    Args:
        dim: token width ``C``.
        reduction: hidden width divisor ``r``.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.deep_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.shallow_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        """``deep`` (ViT) and ``shallow`` (conv) features of equal shape ``(..., C)`` -> fused ``(..., C)``."""
        gate = torch.sigmoid(self.deep_mlp(deep) + self.shallow_mlp(shallow))
        return deep * gate + shallow * (1.0 - gate)
