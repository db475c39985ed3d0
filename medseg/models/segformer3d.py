"""SegFormer3D: a lightweight hierarchical transformer for 3D medical image segmentation.

Paper: S. Perera, P. Navard, A. Yilmaz, "SegFormer3D: an Efficient Transformer for 3D Medical Image Segmentation",
CVPR Workshops (DEF-AI-MIA) 2024, arXiv:2404.10156. Written from the paper and the facts collected in
``docs/models/segformer3d.md``; the upstream code (``OSUPCVLab/SegFormer3D``) is GPL-3.0 and was not copied.

Faithful to the paper configuration:
    * 4-stage Mix-Transformer encoder, overlapping patch embeddings Conv3d (k7, s4, p3) then (k3, s2, p1) x 3, each
      followed by LayerNorm; embed dims 32/64/160/256, heads 1/2/5/8, spatial-reduction ratios 4/2/1/1, 2 blocks per
      stage, MLP ratio 4, LayerNorm after every stage.
    * Pre-norm blocks ``x + Attn(LN(x))``, ``x + MixFFN(LN(x))``. Efficient self-attention: ``q = Linear(C, C)``,
      ``kv = Linear(C, 2C)`` (with bias), keys / values from a Conv3d (kernel = stride = sr) + LayerNorm when
      ``sr > 1``, output Linear; computed with ``F.scaled_dot_product_attention``.
    * Mix-FFN: Linear(C, 4C) -> depthwise Conv3d 3x3x3 -> BatchNorm3d -> GELU -> Linear(4C, C).
    * All-MLP decoder (width 256): per level Linear + LayerNorm, trilinear upsampling to the stage-1 grid, concat in
      the order [c4, c3, c2, c1], Conv3d 1x1x1 (no bias) + BatchNorm3d + ReLU, dropout 0, Conv3d 1x1x1 to the classes,
      x4 trilinear upsampling to the input size.
    * Init: Linear trunc-normal(0.02) / bias 0; LayerNorm and BatchNorm weight 1 / bias 0; Conv3d
      normal(0, sqrt(2 / fan_out)) / bias 0. 4,525,251 parameters at 4 in / 3 out, exactly the official current code's
      count (the paper's 4.51 M is an older revision of that code, 4,511,939).

Deviations and why:
    * **No cube-only restriction.** Upstream recovers the token grid with ``cube_root(N)`` and so needs D = H = W.
      Here every stage carries its grid ``(d, h, w)`` per axis (attention spatial reduction, depthwise conv, stage
      outputs), so any input with each axis divisible by 32 works, e.g. ``(64, 96, 128)``. For cubes the maths is
      identical.
    * The final upsampling targets the input size rather than a fixed scale factor of 4 (identical for valid
      inputs). Inputs are validated first with :func:`medseg.models.checks.check_input`.
    * **Output convention** (``card.output == "softmax"``, :attr:`SegFormer3D.output`): one logit channel per
      mutually exclusive class, background included, label = argmax. The paper's BraTS model instead has 3 **sigmoid**
      channels for the overlapping regions tumour core (TC), whole tumour (WT) and enhancing tumour (ET), trained with
      a sigmoid Dice loss. The network is the same (only the meaning of the output channels differs), so medseg
      trains the 4 BraTS classes of the MSD relabelling (0 background, 1 oedema, 2 non-enhancing tumour, 3 enhancing
      tumour) with softmax Dice + CE, and the paper's regions are unions of the predicted classes: WT = 1 | 2 | 3,
      TC = 2 | 3, ET = 3 (``configs/segformer3d_brats.yaml``).
    * Optional stochastic depth (``drop_path_rate``, MONAI ``DropPath``; default 0 as in the paper).
    * State-dict key names are our own, so upstream checkpoints need a key mapping to be loaded.

BatchNorm in the Mix-FFN needs more than one value per channel in training mode: with a batch of 1, the stage-4
grid of a 32^3 input (1x1x1) fails; use batch >= 2 or larger inputs when training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn

from medseg.core.errors import ConfigError
from medseg.models.card import ModelCard
from medseg.models.checks import check_input
from medseg.models.registry import register_model

__all__ = ["SegFormer3D", "segformer3d"]

Grid = tuple[int, int, int]

# (kernel, stride, padding) of the overlapping patch embedding of each stage; total stride 4 * 2 * 2 * 2 = 32.
_PATCH_EMBED = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))
_DIVISOR = 32


def _to_volume(tokens: Tensor, grid: Grid) -> Tensor:
    """``(B, N, C)`` tokens -> ``(B, C, d, h, w)`` volume on the per-axis grid (``N = d * h * w``)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *grid)


def _to_tokens(volume: Tensor) -> Tensor:
    """``(B, C, d, h, w)`` volume -> ``(B, N, C)`` tokens."""
    return volume.flatten(2).transpose(1, 2)


class _PatchEmbed(nn.Module):
    """Overlapping patch embedding: Conv3d then LayerNorm; returns tokens ``(B, N, C)`` and the grid ``(d, h, w)``."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        x = self.proj(x)
        grid: Grid = (x.shape[2], x.shape[3], x.shape[4])
        return self.norm(_to_tokens(x)), grid


class _EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys / values come from a grid reduced ``sr_ratio`` times per axis."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr: nn.Conv3d | None = None
        self.sr_norm: nn.LayerNorm | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """Attend over ``x`` ``(B, N, C)`` laid out on ``grid``; returns ``(B, N, C)``."""
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, head_dim).transpose(1, 2)
        kv_src = x
        if self.sr is not None and self.sr_norm is not None:
            kv_src = self.sr_norm(_to_tokens(self.sr(_to_volume(x, grid))))
        k, v = self.kv(kv_src).reshape(b, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _MixFFN(nn.Module):
    """Linear -> depthwise Conv3d 3x3x3 -> BatchNorm3d -> GELU -> Linear, on ``(B, N, C)`` tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.bn = nn.BatchNorm3d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        x = _to_tokens(self.bn(self.dwconv(_to_volume(self.fc1(x), grid))))
        return self.fc2(self.act(x))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MixFFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.ffn(self.norm2(x), grid))


class _Stage(nn.Module):
    """Patch embedding, transformer blocks and a final LayerNorm; ``(B, C_in, ...)`` -> ``(B, C, d, h, w)``."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], blocks: list[_Block]) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(in_channels, dim, *patch)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens, grid = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return _to_volume(self.norm(tokens), grid)


class _LinearNorm(nn.Module):
    """Per-level decoder projection: Linear(C_i, E) + LayerNorm(E) on every voxel."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_i, d, h, w)`` -> ``(B, E, d, h, w)``."""
        grid: Grid = (x.shape[2], x.shape[3], x.shape[4])
        return _to_volume(self.norm(self.linear(_to_tokens(x))), grid)


class _AllMLPDecoder(nn.Module):
    """SegFormer's all-MLP head: project, upsample to the stage-1 grid, fuse, classify."""

    def __init__(self, in_dims: Sequence[int], decoder_dim: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.ModuleList([_LinearNorm(c, decoder_dim) for c in in_dims])
        self.fuse = nn.Sequential(
            nn.Conv3d(len(in_dims) * decoder_dim, decoder_dim, kernel_size=1, bias=False),
            nn.BatchNorm3d(decoder_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv3d(decoder_dim, out_channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Stage outputs ``[(B, C_i, d_i, h_i, w_i)]`` (stage 1 first) -> logits ``(B, C_out, d_1, h_1, w_1)``."""
        size = features[0].shape[2:]
        maps = []
        for feat, proj in zip(features, self.linear, strict=True):
            y = proj(feat)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
            maps.append(y)
        x = self.fuse(torch.cat(maps[::-1], dim=1))  # paper order: [c4, c3, c2, c1]
        return self.classifier(self.dropout(x))


def _check_config(
    embed_dims: Sequence[int],
    num_heads: Sequence[int],
    sr_ratios: Sequence[int],
    depths: Sequence[int],
    mlp_ratio: float,
    decoder_dim: int,
    drop_path_rate: float,
) -> None:
    per_stage = {"embed_dims": embed_dims, "num_heads": num_heads, "sr_ratios": sr_ratios, "depths": depths}
    for key, seq in per_stage.items():
        if len(seq) != 4 or any(int(v) < 1 for v in seq):
            raise ConfigError(
                f"segformer3d: {key}={tuple(seq)} is invalid",
                expected="4 positive integers, one per encoder stage",
                hint="the paper uses embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), sr_ratios=(4, 2, 1, 1), "
                "depths=(2, 2, 2, 2)",
            )
    for i, (dim, heads) in enumerate(zip(embed_dims, num_heads, strict=True)):
        if dim % heads:
            raise ConfigError(
                f"segformer3d: embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}",
                expected="every embed dim a multiple of its head count",
            )
    if mlp_ratio <= 0 or decoder_dim < 1 or not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(
            f"segformer3d: mlp_ratio={mlp_ratio}, decoder_dim={decoder_dim}, drop_path_rate={drop_path_rate}",
            expected="mlp_ratio > 0, decoder_dim >= 1 and 0 <= drop_path_rate < 1",
        )


class SegFormer3D(nn.Module):
    """SegFormer3D (arXiv:2404.10156) for inputs with each spatial axis divisible by 32 (not only cubes).

    Args:
        in_channels: input channels ``C_in`` (4 for BraTS).
        out_channels: output channels ``C_out`` (classes, background included).
        embed_dims: channel width of the 4 encoder stages.
        num_heads: attention heads per stage (each must divide its embed dim).
        sr_ratios: spatial-reduction ratio of keys / values per stage (kernel = stride of a Conv3d).
        depths: transformer blocks per stage.
        mlp_ratio: hidden width of the Mix-FFN relative to the stage width.
        decoder_dim: width of the all-MLP decoder.
        drop_path_rate: stochastic-depth rate, increased linearly over all blocks (paper: 0).
        decoder_dropout: dropout before the classifier (paper: 0).

    Attributes:
        output: ``"softmax"``: the output channels are mutually exclusive classes (see the module docstring for the
            paper's sigmoid regions).

    Examples::

        >>> net = SegFormer3D(in_channels=4, out_channels=3)
        >>> net(torch.zeros(1, 4, 64, 96, 128)).shape
        torch.Size([1, 3, 64, 96, 128])
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (4, 2, 1, 1),
        depths: Sequence[int] = (2, 2, 2, 2),
        mlp_ratio: float = 4.0,
        decoder_dim: int = 256,
        drop_path_rate: float = 0.0,
        decoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.output = "softmax"
        _check_config(embed_dims, num_heads, sr_ratios, depths, mlp_ratio, decoder_dim, drop_path_rate)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.divisible_by = (_DIVISOR,) * 3
        # plain floats rather than torch.linspace(...).tolist(), which cannot read values back on the meta device
        n_blocks = sum(depths)
        rates = [drop_path_rate * i / (n_blocks - 1) if n_blocks > 1 else 0.0 for i in range(n_blocks)]
        stages, cursor, prev = [], 0, in_channels
        for i, dim in enumerate(embed_dims):
            blocks = [_Block(dim, num_heads[i], sr_ratios[i], mlp_ratio, rates[cursor + j]) for j in range(depths[i])]
            cursor += depths[i]
            stages.append(_Stage(prev, dim, _PATCH_EMBED[i], blocks))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.decoder = _AllMLPDecoder(embed_dims, decoder_dim, out_channels, decoder_dropout)
        self.apply(_init_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Encoder outputs, stage 1 first: ``(B, C_i, D / 2^(i+2), H / 2^(i+2), W / 2^(i+2))`` for i = 0..3."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        """Segment ``x``.

        Args:
            x: ``(B, C_in, D, H, W)`` with D, H, W multiples of 32.

        Returns:
            Logits ``(B, C_out, D, H, W)``.

        Raises:
            ModelInputError: wrong rank, channel count or indivisible spatial size.
        """
        check_input(x, name="segformer3d", in_channels=self.in_channels, spatial_dims=3, divisible_by=self.divisible_by)
        logits = self.decoder(self.forward_features(x))
        return F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm | nn.BatchNorm3d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv3d):
        fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
        nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_PAPER_CONFIG = {
    "embed_dims": (32, 64, 160, 256),
    "num_heads": (1, 2, 5, 8),
    "sr_ratios": (4, 2, 1, 1),
    "depths": (2, 2, 2, 2),
    "mlp_ratio": 4.0,
    "decoder_dim": 256,
}

_CARD = ModelCard(
    name="segformer3d",
    task="segmentation",
    spatial_dims=3,
    in_channels=4,
    out_channels=3,
    roi_size=(128, 128, 128),
    divisible_by=(_DIVISOR,) * 3,
    target_spacing=None,
    intensity_preset="mri",
    label_names=("background", "label_1", "label_2"),
    output="softmax",
    paper="Perera, Navard, Yilmaz, SegFormer3D: an Efficient Transformer for 3D Medical Image Segmentation, "
    "CVPR-W 2024, arXiv:2404.10156",
    reference_params=4_525_251,  # the official current code's count at 4 in / 3 out (paper: 4.51 M)
    reference_config=dict(_PAPER_CONFIG),
)

_TINY = {
    "embed_dims": (8, 16, 24, 32),
    "num_heads": (1, 1, 1, 2),
    "depths": (1, 1, 1, 1),
    "decoder_dim": 32,
}


@register_model(_CARD, tiny=_TINY)
def segformer3d(
    in_channels: int,
    out_channels: int,
    embed_dims: Sequence[int] = _PAPER_CONFIG["embed_dims"],
    num_heads: Sequence[int] = _PAPER_CONFIG["num_heads"],
    sr_ratios: Sequence[int] = _PAPER_CONFIG["sr_ratios"],
    depths: Sequence[int] = _PAPER_CONFIG["depths"],
    mlp_ratio: float = 4.0,
    decoder_dim: int = 256,
    drop_path_rate: float = 0.0,
) -> SegFormer3D:
    """Build :class:`SegFormer3D`; the defaults are the paper configuration (4.5 M parameters at 4 in / 3 out).

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        embed_dims: width of the 4 encoder stages.
        num_heads: attention heads per stage.
        sr_ratios: key / value spatial-reduction ratio per stage.
        depths: blocks per stage.
        mlp_ratio: Mix-FFN expansion.
        decoder_dim: all-MLP decoder width.
        drop_path_rate: stochastic-depth rate.
    """
    return SegFormer3D(
        in_channels,
        out_channels,
        embed_dims=tuple(embed_dims),
        num_heads=tuple(num_heads),
        sr_ratios=tuple(sr_ratios),
        depths=tuple(depths),
        mlp_ratio=mlp_ratio,
        decoder_dim=decoder_dim,
        drop_path_rate=drop_path_rate,
    )
