"""D-Former: a U-shaped dilated transformer for 3D medical image segmentation.

Paper: Y. Wu, K. Liao, J. Chen, J. Wang, D. Z. Chen, H. Gao, J. Wu, "D-Former: a U-shaped Dilated Transformer for 3D
Medical Image Segmentation", Neural Computing and Applications 2022, arXiv:2201.00462. Written from the paper and the
facts in ``docs/models/dformer.md``; the released reference code (``kkk55596/D-Former``) carries no licence and was
not copied.

Faithful to the released configuration (``SegNetwork`` defaults):
    * Patch embedding Conv3d with kernel = stride = (2, 4, 4) then LayerNorm; stages of width 96/192/384/768, depths
      2/2/6/2, heads 3/6/12/24 (head dim 32), MLP ratio 4 with GELU, qkv bias, no relative-position bias.
    * Pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` alternating inside every stage: even blocks use local
      scope attention (LS-MSA, contiguous groups of ``group_size = (2, 8, 8)`` tokens), odd blocks global scope
      "dilated" attention (GS-MSA): with the padded grid ``(Dp, Hp, Wp)`` the interval is ``I = (Dp // 2, Hp // 8,
      Wp // 8)``, each axis is split as ``(group, I)`` and the group index is the fine ``I`` axis, so a group holds
      2 x 8 x 8 tokens spaced ``I`` apart across the whole volume (see :func:`partition_groups`).
    * When a stage grid is smaller than the group on an axis, the block attends over the whole (unpadded) volume.
    * Dynamic position encoding (CPVT's PEG, ``PosCNN``): a depthwise 3x3x3 Conv3d added residually at the entry of
      every encoder and decoder stage.
    * Patch merging: the 8 voxels of each 2x2x2 cell concatenated (offsets d, h, w = 000, 001, ..., 111) -> LN(8C) ->
      Linear(8C, 2C, no bias). Encoder skips are the stage inputs; a LayerNorm closes the encoder.
    * Decoder: patch expanding Linear(C, 4C, no bias) -> 2x2x2 rearrange -> LN(C/2); at each level the skip is
      concatenated (decoder first), Linear(2C, C) restores the width, then PosCNN + blocks (+ expanding); LN(96) at the
      end.
    * Heads ``FinalPatchExpand_X4``: Linear(C, 32C, no bias), rearranged by the patch size (2, 4, 4) back to voxel
      resolution, LN(C), Conv3d 1x1x1 to the classes without bias. With deep supervision there is one head on the
      last decoder output (96) and one on each of the two expanded decoder features (192 at 1/2, 384 at 1/4
      resolution), as upstream. 50,557,248 parameters at 1 in / 14 out with the three heads (the official definition
      measures 50.56 M).
    * PyTorch default initialisation (upstream applies trunc-normal init only when loading 2D pretrained weights).

Deviations and why:
    * ``out_channels`` is honoured (upstream hard-codes 14 classes).
    * Padding: attention pads every axis (D included; upstream skips D in the global mode) to a multiple of the group
      and masks the padded keys (boolean mask in ``F.scaled_dot_product_attention``; upstream adds -1e6). Global mode
      pads to the group multiple instead of upstream's ``interval_list`` multiple, so the interval is always
      ``padded // group``. Patch merging pads odd D as well as H / W, and the decoder crops an expanded map back to
      its skip's grid, so odd token grids work inside the network.
    * Full attention is chosen when *any* axis of the stage grid is below the group (upstream tests H only and then
      switches the block permanently, which breaks a later call with a larger input); it is decided per call.
    * Deep supervision (off by default; the auxiliary heads exist only when it is on) returns a list in training
      mode, full resolution first, then 1/2 and 1/4 resolution logits at their native size (the loss resizes the
      target). Upstream returns only two maps (a ``zip`` truncation drops the 1/4 head).
    * Optional stochastic depth (``drop_path_rate``, MONAI ``DropPath``; 0 as upstream). State-dict keys are our own.
    * Inputs are validated with :func:`medseg.models.checks.check_input`: each axis must be a multiple of
      ``patch_size * 2^(stages - 1)`` = (16, 32, 32), so the token grid after the patch embedding is divisible by 8.
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

__all__ = ["DFormer3D", "DFormerBlock3D", "dformer", "partition_groups", "reverse_groups"]

Grid = tuple[int, int, int]


def _grid(x: Tensor) -> Grid:
    """Spatial grid ``(D, H, W)`` of a channels-last map ``(B, D, H, W, C)``."""
    return (x.shape[1], x.shape[2], x.shape[3])


def _crop(x: Tensor, grid: Sequence[int]) -> Tensor:
    """Crop a channels-last map ``(B, D, H, W, C)`` to ``grid`` (no-op when it already fits)."""
    if _grid(x) == tuple(grid):
        return x
    return x[:, : grid[0], : grid[1], : grid[2]]


def partition_groups(x: Tensor, group: Grid, dilated: bool) -> Tensor:
    """Split a padded channels-last map into attention groups.

    Args:
        x: ``(B, Dp, Hp, Wp, C)`` with every axis a multiple of ``group``.
        group: tokens per group along D, H, W.
        dilated: ``False`` for local groups (contiguous blocks of ``group`` tokens); ``True`` for the global, dilated
            groups of GS-MSA: each axis of length ``Np`` is read as ``(group, I)`` with the interval ``I = Np // group``
            and the group index on the fine ``I`` axis, so group ``j`` holds the tokens ``j, j + I, j + 2I, ...``.

    Returns:
        ``(B, num_groups, group_d * group_h * group_w, C)``; groups and tokens in row-major order.
    """
    b, dp, hp, wp, c = x.shape
    gd, gh, gw = group
    if dilated:
        x = x.reshape(b, gd, dp // gd, gh, hp // gh, gw, wp // gw, c).permute(0, 2, 4, 6, 1, 3, 5, 7)
    else:
        x = x.reshape(b, dp // gd, gd, hp // gh, gh, wp // gw, gw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, gd * gh * gw, c)


def reverse_groups(groups: Tensor, grid: Grid, group: Grid, dilated: bool) -> Tensor:
    """Inverse of :func:`partition_groups`: ``(B, num_groups, T, C)`` -> ``(B, Dp, Hp, Wp, C)`` on the padded grid."""
    b, c = groups.shape[0], groups.shape[-1]
    (dp, hp, wp), (gd, gh, gw) = grid, group
    if dilated:
        x = groups.reshape(b, dp // gd, hp // gh, wp // gw, gd, gh, gw, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    else:
        x = groups.reshape(b, dp // gd, hp // gh, wp // gw, gd, gh, gw, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, dp, hp, wp, c)


class GroupAttention(nn.Module):
    """Multi-head self-attention inside each group, padded keys masked out (LS-MSA / GS-MSA core)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Attend within groups.

        Args:
            x: ``(B, G, T, C)`` tokens of ``G`` groups of ``T`` tokens.
            valid: ``(G, T)`` boolean, ``False`` for padded tokens that must not be attended to; ``None``: all real.

        Returns:
            ``(B, G, T, C)``.
        """
        b, g, t, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b * g, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        mask = None
        if valid is not None:
            mask = valid[None, :, None, None, :].expand(b, g, 1, 1, t).reshape(b * g, 1, 1, t)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, g, t, c))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on channels-last tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DFormerBlock3D(nn.Module):
    """Pre-norm D-Former block with local (LS-MSA) or dilated global (GS-MSA) group attention.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (must divide ``dim``).
        group_size: tokens per group along D, H, W (paper: (2, 8, 8)).
        dilated: ``True`` for GS-MSA (odd blocks of a stage), ``False`` for LS-MSA (even blocks).
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: bias of the qkv projection.
        drop_path: stochastic-depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: Grid,
        dilated: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.dilated = dilated
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attend(self, x: Tensor) -> Tensor:
        """Group attention on a channels-last map ``(B, D, H, W, C)``, same shape out."""
        b, c = x.shape[0], x.shape[-1]
        grid = _grid(x)
        if any(n < g for n, g in zip(grid, self.group_size, strict=True)):
            # The stage grid is smaller than a group: one group holding the whole volume (full attention).
            return self.attn(x.reshape(b, 1, -1, c)).reshape(x.shape)
        gd, gh, gw = self.group_size
        padded = (-(-grid[0] // gd) * gd, -(-grid[1] // gh) * gh, -(-grid[2] // gw) * gw)
        valid = None
        if padded != grid:
            pad = [p - n for p, n in zip(padded, grid, strict=True)]
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
            real = torch.zeros(1, *padded, 1, dtype=torch.bool, device=x.device)
            real[:, : grid[0], : grid[1], : grid[2]] = True
            valid = partition_groups(real, self.group_size, self.dilated)[0, :, :, 0]
        groups = self.attn(partition_groups(x, self.group_size, self.dilated), valid)
        return _crop(reverse_groups(groups, padded, self.group_size, self.dilated), grid)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PosCNN(nn.Module):
    """Dynamic position encoding (CPVT's PEG): ``x + DepthwiseConv3d_3x3x3(x)`` on a channels-last map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        return x + self.proj(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


class PatchEmbed3D(nn.Module):
    """Non-overlapping patch embedding Conv3d (kernel = stride = ``patch_size``) + LayerNorm, channels-last out."""

    def __init__(self, in_channels: int, dim: int, patch_size: Grid) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, D, H, W)`` (zero-padded to patch multiples) -> ``(B, D / 2, H / 4, W / 4, C)``."""
        pad = [-s % p for s, p in zip(x.shape[2:], self.patch_size, strict=True)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class PatchMerging(nn.Module):
    """2x2x2 cell concat (odd axes zero-padded) -> LN(8C) -> Linear(8C, 2C, no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> ``(B, ceil(D / 2), ceil(H / 2), ceil(W / 2), 2C)``."""
        d, h, w = _grid(x)
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        b, d, h, w, c = x.shape
        # Channel order (dd, hh, ww, c): the offsets 000, 001, 010, ..., 111 of the paper's concatenation.
        x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.reduction(self.norm(x.reshape(b, d // 2, h // 2, w // 2, 8 * c)))


def _unpatch(x: Tensor, factor: Sequence[int]) -> Tensor:
    """``(B, D, H, W, f0 * f1 * f2 * C)`` -> ``(B, f0 D, f1 H, f2 W, C)``, channels read as ``(f0, f1, f2, C)``."""
    b, d, h, w, c = x.shape
    f0, f1, f2 = factor
    c //= f0 * f1 * f2
    x = x.reshape(b, d, h, w, f0, f1, f2, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d * f0, h * f1, w * f2, c)


class PatchExpand3D(nn.Module):
    """Linear(C, 4C, no bias) -> 2x2x2 rearrange -> LN(C / 2): doubles the grid, halves the width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> ``(B, 2D, 2H, 2W, C / 2)``."""
        return self.norm(_unpatch(self.expand(x), (2, 2, 2)))


class FinalPatchExpand_X4(nn.Module):  # noqa: N801 - the paper code's name
    """Segmentation head: Linear(C, prod(patch) C, no bias) -> rearrange by ``patch_size`` -> LN(C) -> 1x1x1 conv."""

    def __init__(self, dim: int, out_channels: int, patch_size: Grid) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.expand = nn.Linear(dim, math.prod(patch_size) * dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Conv3d(dim, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` tokens -> logits ``(B, C_out, 2D, 4H, 4W)`` (for the patch size (2, 4, 4))."""
        x = self.norm(_unpatch(self.expand(x), self.patch_size))
        return self.classifier(x.permute(0, 4, 1, 2, 3))


class BasicLayer(nn.Module):
    """One stage: PosCNN, alternating LS-MSA / GS-MSA blocks, then an optional patch merging or expanding."""

    def __init__(self, blocks: list[DFormerBlock3D], dim: int, resample: nn.Module | None) -> None:
        super().__init__()
        self.pos_block = PosCNN(dim)
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> the resampled map (or the same shape for the last stage)."""
        x = self.pos_block(x)
        for block in self.blocks:
            x = block(x)
        return x if self.resample is None else self.resample(x)


def _check_config(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    patch_size: Sequence[int],
    group_size: Sequence[int],
) -> None:
    if len(depths) < 2 or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
        raise ConfigError(
            f"dformer: depths={tuple(depths)} and num_heads={tuple(num_heads)} are invalid",
            expected="the same number (>= 2) of positive entries, one per stage",
            hint="the paper uses depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)",
        )
    for i, heads in enumerate(num_heads):
        if (embed_dim * 2**i) % heads:
            raise ConfigError(
                f"dformer: stage {i} width {embed_dim * 2**i} is not divisible by num_heads[{i}]={heads}",
                expected="embed_dim * 2^i a multiple of num_heads[i]",
            )
    if embed_dim < 2 or len(patch_size) != 3 or len(group_size) != 3 or min(*patch_size, *group_size) < 1:
        raise ConfigError(
            f"dformer: embed_dim={embed_dim}, patch_size={tuple(patch_size)}, group_size={tuple(group_size)}",
            expected="embed_dim >= 2 and 3 positive entries for patch_size and group_size",
            hint="the paper uses embed_dim=96, patch_size=(2, 4, 4), group_size=(2, 8, 8)",
        )


class DFormer3D(nn.Module):
    """D-Former (arXiv:2201.00462): dilated-transformer U-Net over ``(2, 4, 4)`` patches.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out`` (classes, background included).
        embed_dim: width of stage 1; stage ``i`` has ``embed_dim * 2^i`` channels.
        depths: blocks per encoder stage (the decoder mirrors them, the bottleneck stage excepted).
        num_heads: attention heads per stage.
        patch_size: patch embedding kernel = stride (D, H, W).
        group_size: tokens per attention group (D, H, W).
        mlp_ratio: MLP expansion.
        qkv_bias: bias of the qkv projections.
        drop_path_rate: stochastic-depth rate, increased linearly over the encoder blocks (mirrored in the decoder).
        deep_supervision: build the auxiliary heads and return ``[full, 1/2, 1/4 ...]`` logits in training mode.

    Examples::

        >>> net = DFormer3D(in_channels=1, out_channels=14).eval()
        >>> net(torch.zeros(1, 1, 64, 128, 128)).shape
        torch.Size([1, 14, 64, 128, 128])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        patch_size: Sequence[int] = (2, 4, 4),
        group_size: Sequence[int] = (2, 8, 8),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        _check_config(embed_dim, depths, num_heads, patch_size, group_size)
        if mlp_ratio <= 0 or not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(
                f"dformer: mlp_ratio={mlp_ratio}, drop_path_rate={drop_path_rate}",
                expected="mlp_ratio > 0 and 0 <= drop_path_rate < 1",
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision
        self.patch_size: Grid = tuple(int(p) for p in patch_size)  # type: ignore[assignment]
        group: Grid = tuple(int(g) for g in group_size)  # type: ignore[assignment]
        n = len(depths)
        self.divisible_by = tuple(p * 2 ** (n - 1) for p in self.patch_size)
        dims = [embed_dim * 2**i for i in range(n)]
        total = sum(depths)  # plain floats (not torch.linspace) so the model can be built on the meta device
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        starts = [sum(depths[:i]) for i in range(n)]

        def blocks(i: int) -> list[DFormerBlock3D]:
            return [
                DFormerBlock3D(dims[i], num_heads[i], group, j % 2 == 1, mlp_ratio, qkv_bias, rates[starts[i] + j])
                for j in range(depths[i])
            ]

        self.patch_embed = PatchEmbed3D(in_channels, embed_dim, self.patch_size)
        self.layers = nn.ModuleList(
            [BasicLayer(blocks(i), dims[i], PatchMerging(dims[i]) if i < n - 1 else None) for i in range(n)]
        )
        self.norm = nn.LayerNorm(dims[-1])
        # Decoder level k works at stage n - 1 - k; level 0 only expands the bottleneck.
        up: list[nn.Module] = [PatchExpand3D(dims[-1])]
        concat: list[nn.Module] = [nn.Identity()]
        for k in range(1, n):
            i = n - 1 - k
            up.append(BasicLayer(blocks(i), dims[i], PatchExpand3D(dims[i]) if i > 0 else None))
            concat.append(nn.Linear(2 * dims[i], dims[i]))
        self.layers_up = nn.ModuleList(up)
        self.concat_back_dim = nn.ModuleList(concat)
        self.norm_up = nn.LayerNorm(embed_dim)
        head_dims = dims[: n - 1] if deep_supervision else dims[:1]
        self.heads = nn.ModuleList([FinalPatchExpand_X4(d, out_channels, self.patch_size) for d in head_dims])

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, C_in, D, H, W)`` with each axis a multiple of :attr:`divisible_by` ((16, 32, 32) by default).

        Returns:
            Logits ``(B, C_out, D, H, W)``; in training mode with deep supervision a list: the full-resolution logits
            first, then ``(B, C_out, D / 2^k, H / 2^k, W / 2^k)`` for k = 1, 2 (native resolution of each head).

        Raises:
            ModelInputError: wrong rank, channel count or indivisible spatial size.
        """
        check_input(x, name="dformer", in_channels=self.in_channels, spatial_dims=3, divisible_by=self.divisible_by)
        return self._segment(x)

    def _segment(self, x: Tensor) -> Tensor | list[Tensor]:
        """Forward without the divisibility check: any size works through padding (input, merging, attention)."""
        size = x.shape[2:]
        tokens = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(tokens)
            tokens = layer(tokens)
        tokens = self.norm(tokens)
        n = len(self.layers)
        aux: list[Tensor] = []  # expanded decoder features, coarsest first (the inputs of the auxiliary heads)
        for k, (layer, concat) in enumerate(zip(self.layers_up, self.concat_back_dim, strict=True)):
            if k > 0:
                tokens = concat(torch.cat([tokens, skips[n - 1 - k]], dim=-1))
            tokens = layer(tokens)
            if k < n - 1:
                tokens = _crop(tokens, _grid(skips[n - 2 - k]))  # undo the padding of an odd merge
                aux.append(tokens)
        logits = self.heads[0](self.norm_up(tokens))[:, :, : size[0], : size[1], : size[2]]
        if not (self.training and self.deep_supervision):
            return logits
        # aux[k] has the width of stage n - 2 - k, the width of heads[n - 2 - k]; full resolution first.
        return [logits] + [self.heads[j](aux[n - 2 - j]) for j in range(1, len(self.heads))]


_PAPER_CONFIG = {
    "embed_dim": 96,
    "depths": (2, 2, 6, 2),
    "num_heads": (3, 6, 12, 24),
    "patch_size": (2, 4, 4),
    "group_size": (2, 8, 8),
    "deep_supervision": True,
}

_CARD = ModelCard(
    name="dformer",
    task="segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=14,
    roi_size=(64, 128, 128),
    divisible_by=(16, 32, 32),
    target_spacing=None,
    intensity_preset="ct",
    label_names=("background",) + tuple(f"label_{i}" for i in range(1, 14)),
    paper="Wu et al., D-Former, Neural Computing and Applications 2022, arXiv:2201.00462",
    reference_params=50_557_248,  # exact count of this build at 1 in / 14 out (official code measured: 50.56 M)
    reference_config=dict(_PAPER_CONFIG),
)

_TINY = {"embed_dim": 12, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}


@register_model(_CARD, tiny=_TINY)
def dformer(
    in_channels: int,
    out_channels: int,
    embed_dim: int = 96,
    depths: Sequence[int] = _PAPER_CONFIG["depths"],
    num_heads: Sequence[int] = _PAPER_CONFIG["num_heads"],
    patch_size: Sequence[int] = _PAPER_CONFIG["patch_size"],
    group_size: Sequence[int] = _PAPER_CONFIG["group_size"],
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    deep_supervision: bool = False,
) -> DFormer3D:
    """Build :class:`DFormer3D`; the defaults are the released configuration (single head, 44,649,792 parameters at
    1 in / 14 out; 50,557,248 with ``deep_supervision=True`` and its three heads).

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        embed_dim: stage-1 width.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        patch_size: patch embedding size (D, H, W).
        group_size: attention group size (D, H, W).
        mlp_ratio: MLP expansion.
        drop_path_rate: stochastic-depth rate.
        deep_supervision: auxiliary heads and list output in training mode.
    """
    return DFormer3D(
        in_channels,
        out_channels,
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        patch_size=tuple(patch_size),
        group_size=tuple(group_size),
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
        deep_supervision=deep_supervision,
    )
