"""MPU-Net: a U-Net with serialised position attention and multi-scale cross-attention decoding (3D, CT).

Paper: Z. Yu, S. Han, Z. Song, "3D Medical Image Segmentation based on multi-scale MPU-Net", arXiv:2307.05799 (2023).
**This is a re-implementation from the abstract**: no official code exists
(``Corawill/MPU-Net`` and ``BinsonW/MPU-Net`` are unrelated networks with the same name) and only the abstract was
available (``docs/models/mpunet.md``). No number of this module can be compared with the paper's table.

What the abstract states, and what this module therefore contains:
    * A U-Net whose bottleneck carries a Transformer-inspired global attention built from "image serialisation" and a
      Position Attention Module (PAM); every decoder layer carries a multi-scale module and a cross-attention; a
      hybrid loss that "better exploits high-resolution feature information"; evaluated on LiTS 2017 CT with Dice,
      accuracy, precision, specificity, IoU and MCC (see :mod:`medseg.training.confusion`).

Every assumption (none of these is stated in the abstract):
    1. **Backbone.** A 3D nnU-Net-style U-Net, the same family as medseg's ``unet`` baseline so the two differ only in
       the additions below: 5 resolution stages (4 downsamplings, ``divisible_by`` 16), widths 32/64/128/256/320, each
       stage two conv3x3x3 - InstanceNorm(affine) - LeakyReLU(0.01) (MONAI ``UnetBasicBlock``), downsampling by the
       stride-2 first convolution, upsampling by a transposed convolution (kernel = stride = 2). PyTorch default init.
    2. **Image serialisation + PAM at the bottleneck only** (the cheapest place; the abstract does not say where). The
       bottleneck map ``(B, C, d, h, w)`` is flattened to a token sequence ``(B, d*h*w, C)`` after adding a learned
       position embedding ``(1, C, 8, 8, 8)`` (the 128^3 ROI's bottleneck grid, ``pos_grid``), trilinearly resized when
       the grid differs (ViT-style position-embedding interpolation, so any valid input size works). PAM as defined
       by DANet (Fu et al., CVPR 2019): query and key are 1x1 projections to ``C // 8`` channels, value a 1x1
       projection to ``C``; attention is the softmax over all positions of the unscaled query-key products;
       output ``tokens + gamma * attention(values)`` with a learnable scalar ``gamma`` initialised to 0. 1x1x1
       convolutions on a serialised sequence are implemented as ``nn.Linear`` (identical maths); the key projection has
       no bias (DANet's has one, but the softmax over positions cancels it exactly). No MLP, no norm.
    3. **Cross-attention at every decoder level: decoder features are the queries, the same-level encoder skip gives
       keys and values.** Full attention is impossible at full resolution (2.1 M queries at 128^3), so it is
       **windowed with pooled keys**: the grid is cut into non-overlapping ``window``^3 windows (8^3 by default;
       per axis ``gcd(window, size)`` so every valid input is covered without padding), keys / values are the skip
       average-pooled ``kv_pool`` times (2 by default) inside the window, so each query attends to
       ``(8 / 2)^3 = 64`` keys. An axis is pooled only where at least 2 keys remain along it, so no window ever
       attends to a single key (on the coarsest decoder level of an input whose side is 16 x an odd number the window
       is 2 voxels wide there, and its 2 keys stay unpooled). Memory and compute are linear in the number of voxels
       (``N * 64`` scores per head). Pre-norm (LayerNorm on channels for queries and keys), multi-head with head dim
       32 (at least one head), output projection, residual onto the decoder features.
    4. **Multi-scale module at every decoder level**: the attended decoder features are concatenated with the skip,
       reduced by a 1x1x1 conv - IN - LeakyReLU to the level width, then three parallel 3x3x3 conv - IN - LeakyReLU
       branches with dilations 1 / 2 / 3 are concatenated and fused by a 1x1x1 conv - IN, added to the block input
       (residual) and passed through LeakyReLU.
    5. **Deep supervision** (the "high-resolution" hint): a 1x1x1 head at the full-resolution level (main output) and
       at the next ``deep_supr_num`` (3) coarser decoder levels. In training mode the model returns the list
       ``[main, aux_1, ..., aux_k]`` with every auxiliary output trilinearly upsampled to the input size (as MONAI
       ``DynUNet`` does); in eval mode only the main logits.
    6. **Hybrid loss** = Dice + cross-entropy (equal weights) on the main output plus the same loss on the auxiliary
       outputs with halving weights ``0.5, 0.25, 0.125`` (main 1), normalised to sum 1; registered as
       ``mpunet_hybrid`` in :mod:`medseg.training.losses.mpunet` and the model's ``paper_loss``, so the trainer uses
       it (and these weights, not nnU-Net's deep-supervision rule) unless ``train.loss`` names another.
    7. **Task / labels**: LiTS 2017 labels ``background / liver / tumour`` (3 softmax channels); the abstract's ~92 %
       Dice looks like a liver(+tumour) figure (its Dice / accuracy / specificity imply ~6 % foreground), so report
       per label. CT intensity preset, ROI 128^3 (patch size and spacing are not stated; 128^3 matches the ``unet``
       baseline's ROI).

Size: 17,627,317 parameters at 1 in / 3 out in the default configuration (own count, used as ``reference_params``
because the paper gives none): encoder 8,492,000; serialisation + PAM 292,201 (position embedding 163,840); decoder
8,841,664 (transposed convs 999,424; cross-attention 352,000; multi-scale blocks 7,490,240); heads 1,452.

The bottleneck must hold more than one voxel (InstanceNorm cannot normalise a single value), so the smallest input
is e.g. ``(16, 16, 32)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock
from torch import Tensor, nn

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models.card import ModelCard
from medseg.models.checks import check_input
from medseg.models.registry import register_model

__all__ = ["MPUNet", "mpunet"]

Grid = tuple[int, int, int]

_FILTERS = (32, 64, 128, 256, 320)
_NORM = ("INSTANCE", {"affine": True})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
_HEAD_DIM = 32


def _conv_norm_act(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1, act: bool = True) -> nn.Sequential:
    """Conv3d (no bias; an affine InstanceNorm follows) - InstanceNorm3d - optional LeakyReLU, 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv3d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.InstanceNorm3d(out_ch, affine=True),
    ]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


def _to_windows(x: Tensor, window: Grid) -> Tensor:
    """``(B, C, D, H, W)`` -> ``(B * nW, w0 * w1 * w2, C)`` non-overlapping windows, channels last."""
    b, c, d, h, w = x.shape
    w0, w1, w2 = window
    x = x.reshape(b, c, d // w0, w0, h // w1, w1, w // w2, w2)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, w0 * w1 * w2, c)


def _from_windows(t: Tensor, window: Grid, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_to_windows`: ``(B * nW, w0 * w1 * w2, C)`` -> ``(B, C, D, H, W)``."""
    b, c, d, h, w = shape
    w0, w1, w2 = window
    t = t.reshape(b, d // w0, h // w1, w // w2, w0, w1, w2, c)
    return t.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, d, h, w)


class _SerialisedPAM(nn.Module):
    """Image serialisation (learned position embedding) + DANet Position Attention Module over the token sequence.

    Args:
        channels: bottleneck channels ``C`` (at least 8, query / key use ``C // 8``).
        pos_grid: grid of the learned position embedding (the card ROI's bottleneck grid).
    """

    def __init__(self, channels: int, pos_grid: Grid) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, *pos_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Linear(channels, channels // 8)
        # a key bias adds q . b to every logit of a query, which the softmax over positions cancels: left out
        self.key = nn.Linear(channels, channels // 8, bias=False)
        self.value = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, d, h, w)`` -> ``(B, C, d, h, w)``."""
        pos = self.pos_embed
        if pos.shape[2:] != x.shape[2:]:
            pos = F.interpolate(pos, size=x.shape[2:], mode="trilinear", align_corners=False)
        tokens = (x + pos).flatten(2).transpose(1, 2)  # serialisation: (B, N, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)  # DANet: no 1/sqrt(d) scaling
        tokens = tokens + self.gamma * attended
        return tokens.transpose(1, 2).reshape(x.shape)


class _WindowCrossAttention(nn.Module):
    """Decoder queries attend to the same-level skip (keys / values pooled ``kv_pool`` times) inside windows.

    Args:
        channels: channels of both the decoder features and the skip.
        window: window edge (per axis ``gcd(window, size)`` is used).
        kv_pool: average-pooling factor of keys / values inside a window (per axis ``gcd(kv_pool, window)``).
    """

    def __init__(self, channels: int, window: int, kv_pool: int) -> None:
        super().__init__()
        self.window, self.kv_pool = window, kv_pool
        self.heads = max(1, channels // _HEAD_DIM)
        if channels % self.heads:
            self.heads = 1
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def windowing(self, grid: Sequence[int]) -> tuple[Grid, Grid]:
        """Window and key / value pooling per axis for a level of spatial size ``grid``.

        The window is ``gcd(window, size)`` per axis; keys / values are pooled by ``gcd(kv_pool, window)`` only where
        that leaves at least 2 of them along the axis, so a small window (e.g. the 2 voxels of the coarsest decoder
        level of an input whose sides are 16 x an odd number) keeps its keys unpooled instead of collapsing to a
        single key, which would make the attention a constant copy of one value.
        """
        window: Grid = tuple(math.gcd(self.window, int(s)) for s in grid)  # type: ignore[assignment]
        pool: Grid = tuple(  # type: ignore[assignment]
            p if w // p >= 2 else 1 for w, p in ((w, math.gcd(self.kv_pool, w)) for w in window)
        )
        return window, pool

    def forward(self, dec: Tensor, skip: Tensor) -> Tensor:
        """``dec``, ``skip``: ``(B, C, D, H, W)`` on the same grid -> refined decoder features ``(B, C, D, H, W)``."""
        window, pool = self.windowing(dec.shape[2:])
        kv_src = F.avg_pool3d(skip, pool) if max(pool) > 1 else skip
        kv_window: Grid = tuple(w // p for w, p in zip(window, pool, strict=True))  # type: ignore[assignment]
        q_tokens = _to_windows(dec, window)  # (B * nW, Nq, C)
        kv_tokens = _to_windows(kv_src, kv_window)  # (B * nW, Nk, C): same window order
        n, nq, c = q_tokens.shape
        heads, hd = self.heads, c // self.heads
        q = self.q(self.norm_q(q_tokens)).reshape(n, nq, heads, hd).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv_tokens)).reshape(n, -1, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, nq, c)
        return dec + _from_windows(self.proj(out), window, dec.shape)


class _MultiScaleBlock(nn.Module):
    """Reduce ``[decoder, skip]`` by 1x1x1, then parallel dilated 3x3x3 branches fused by 1x1x1, with a residual.

    Args:
        in_channels: channels of the concatenated input.
        channels: output channels (the level width).
        dilations: dilation of each 3x3x3 branch.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.reduce = _conv_norm_act(in_channels, channels)
        self.branches = nn.ModuleList(_conv_norm_act(channels, channels, 3, d) for d in dilations)
        self.fuse = _conv_norm_act(len(dilations) * channels, channels, act=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        return self.act(x + self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1)))


class _DecoderLevel(nn.Module):
    """Upsample, cross-attend to the skip, concatenate with it and run the multi-scale block."""

    def __init__(self, in_channels: int, channels: int, window: int, kv_pool: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, channels, kernel_size=2, stride=2, bias=False)
        self.cross = _WindowCrossAttention(channels, window, kv_pool)
        self.block = _MultiScaleBlock(2 * channels, channels, dilations)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(x)
        return self.block(torch.cat([self.cross(up, skip), skip], dim=1))


class MPUNet(nn.Module):
    """MPU-Net re-implemented from the abstract (see the module docstring for every assumption).

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (classes, background included).
        filters: width of each resolution stage, finest first; ``len(filters) - 1`` downsamplings by 2.
        pos_grid: grid of the bottleneck's learned position embedding (ROI / 2^downsamplings).
        window: cross-attention window edge in voxels of each decoder level.
        kv_pool: average-pooling factor of the cross-attention keys / values inside a window.
        dilations: dilations of the multi-scale block's parallel 3x3x3 branches.
        deep_supervision: in training mode also return ``deep_supr_num`` auxiliary outputs.
        deep_supr_num: number of auxiliary outputs (coarser decoder levels), below the number of downsamplings.

    Attributes:
        paper_loss: loss registry name the trainer uses by default: ``"mpunet_hybrid"``, whose own output weights
            (1 / 0.5 / 0.25 / 0.125) replace nnU-Net's deep-supervision weighting.

    Examples::

        >>> net = MPUNet(1, 3, filters=(8, 16, 32, 64, 64)).eval()
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    paper_loss = "mpunet_hybrid"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        filters: Sequence[int] = _FILTERS,
        pos_grid: Sequence[int] = (8, 8, 8),
        window: int = 8,
        kv_pool: int = 2,
        dilations: Sequence[int] = (1, 2, 3),
        deep_supervision: bool = True,
        deep_supr_num: int = 3,
    ) -> None:
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if len(filters) < 3 or min(filters) < 1 or filters[-1] < 8:
            raise ConfigError(
                f"mpunet: filters={filters} are invalid",
                expected="at least 3 positive stage widths, the last (bottleneck) >= 8 for the PAM's C // 8",
                hint="e.g. filters=(32, 64, 128, 256, 320)",
            )
        if len(tuple(pos_grid)) != 3 or min(pos_grid) < 1 or window < 1 or kv_pool < 1 or not dilations:
            raise ConfigError(
                f"mpunet: pos_grid={tuple(pos_grid)}, window={window}, kv_pool={kv_pool}, dilations={dilations}",
                expected="3 positive pos_grid sizes, window >= 1, kv_pool >= 1, at least one dilation",
            )
        if deep_supervision and not 1 <= deep_supr_num < len(filters) - 1:
            raise ConfigError(
                f"mpunet: deep_supr_num={deep_supr_num} with {len(filters) - 1} downsamplings",
                expected=f"1 <= deep_supr_num <= {len(filters) - 2}",
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.deep_supervision, self.deep_supr_num = deep_supervision, deep_supr_num
        self.divisible_by = (2 ** (len(filters) - 1),) * 3
        self.encoder = nn.ModuleList(
            UnetBasicBlock(3, c_in, c_out, kernel_size=3, stride=1 if i == 0 else 2, norm_name=_NORM, act_name=_ACT)
            for i, (c_in, c_out) in enumerate(zip((in_channels, *filters[:-1]), filters, strict=True))
        )
        self.bottleneck_attention = _SerialisedPAM(filters[-1], tuple(int(g) for g in pos_grid))  # type: ignore[arg-type]
        # decoder[i] produces level i (finest first) from level i + 1
        self.decoder = nn.ModuleList(
            _DecoderLevel(filters[i + 1], filters[i], window, kv_pool, dilations) for i in range(len(filters) - 1)
        )
        n_heads = 1 + (deep_supr_num if deep_supervision else 0)
        self.heads = nn.ModuleList(nn.Conv3d(filters[i], out_channels, kernel_size=1) for i in range(n_heads))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, C_in, D, H, W)`` with each axis a multiple of :attr:`divisible_by`.

        Returns:
            Logits ``(B, C_out, D, H, W)``; in training mode with deep supervision a list of such tensors, the main
            (full-resolution) output first, then the auxiliary outputs from the finest to the coarsest level, each
            trilinearly upsampled to the input size.

        Raises:
            ModelInputError: wrong rank, channel count, indivisible spatial size, or a 1-voxel bottleneck.
        """
        check_input(x, name="mpunet", in_channels=self.in_channels, spatial_dims=3, divisible_by=self.divisible_by)
        bottleneck = tuple(s // k for s, k in zip(x.shape[2:], self.divisible_by, strict=True))
        if math.prod(bottleneck) == 1:
            raise ModelInputError(
                f"mpunet: input spatial shape {tuple(x.shape[2:])} leaves a single bottleneck voxel {bottleneck}, "
                "and InstanceNorm needs more than one",
                expected=f"at least one axis twice its divisor {self.divisible_by}",
                hint="use a larger patch (sliding-window inference with the card's roi_size)",
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck_attention(skips.pop())
        levels: list[Tensor] = []
        for level in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[level](x, skips[level])
            levels.append(x)
        levels.reverse()  # finest first
        main = self.heads[0](levels[0])
        if not (self.training and self.deep_supervision):
            return main
        size = main.shape[2:]
        aux = [
            F.interpolate(head(levels[i]), size=size, mode="trilinear", align_corners=False)
            for i, head in enumerate(self.heads)
            if i > 0
        ]
        return [main, *aux]


_CARD = ModelCard(
    name="mpunet",
    task="segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=3,
    roi_size=(128, 128, 128),
    divisible_by=(16, 16, 16),
    target_spacing=None,
    intensity_preset="ct",
    label_names=("background", "liver", "tumour"),
    paper="Yu, Han, Song, MPU-Net, arXiv:2307.05799 (re-implemented from the abstract)",
    reference_params=17_627_317,  # own count of the default configuration at 1 in / 3 out (the paper gives none)
    reference_config={"filters": _FILTERS, "deep_supervision": True},
)


@register_model(_CARD, tiny={"filters": (4, 8, 8, 16, 16), "pos_grid": (2, 2, 2), "window": 4})
def mpunet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = _FILTERS,
    pos_grid: Sequence[int] = (8, 8, 8),
    window: int = 8,
    kv_pool: int = 2,
    dilations: Sequence[int] = (1, 2, 3),
    deep_supervision: bool = True,
    deep_supr_num: int = 3,
) -> MPUNet:
    """Build :class:`MPUNet` (re-implemented from the abstract); see the class for the arguments.

    ``divisible_by`` (``2 ** (len(filters) - 1)`` per axis) is copied into ``model.card`` by
    :func:`~medseg.models.registry.create_model`.
    """
    return MPUNet(
        in_channels,
        out_channels,
        filters=tuple(filters),
        pos_grid=tuple(pos_grid),
        window=window,
        kv_pool=kv_pool,
        dilations=tuple(dilations),
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
    )
