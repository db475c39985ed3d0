"""The Segment Anything image encoder: a plain ViT with windowed / global attention and a convolutional neck.

Paper: A. Kirillov et al., "Segment Anything", arXiv:2304.02643 (2023); the backbone follows ViTDet (Y. Li et al.,
"Exploring Plain Vision Transformer Backbones for Object Detection", arXiv:2203.16527) with the decomposed relative
position bias of MViTv2 (Y. Li et al., arXiv:2112.01526).

Module and parameter names match the ``image_encoder.*`` part of the official checkpoints (``sam_vit_b_01ec64.pth``):
``patch_embed.proj``, ``pos_embed`` ``(1, S/16, S/16, C)``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, attn.rel_pos_h,
attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2}`` and ``neck.{0, 1, 2, 3}``. Tokens travel channels-last, ``(B, h, w, C)``.

Inputs whose token grid differs from the one the encoder was built for are handled as SAM does for its relative
position tables (linear interpolation of a table whose length does not fit) and, for the absolute position
embedding, by bicubic interpolation of the ``(h, w)`` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "PatchEmbed",
    "decomposed_rel_pos_bias",
    "resize_rel_pos",
    "window_partition",
    "window_unpartition",
]

_LN_EPS = 1e-6


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channel axis of a ``(B, C, H, W)`` map (per pixel), with affine parameters.

    Args:
        num_channels: ``C``.
        eps: added to the variance.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``(B, C, H, W)`` over ``C``; returns ``(B, C, H, W)``."""
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(dim=1, keepdim=True)
        normed = centred * torch.rsqrt(var + self.eps)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))`` on the last axis.

    Args:
        embedding_dim: input and output width.
        mlp_dim: hidden width.
        act: activation class (GELU in the ViT, ReLU in the two-way transformer).
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        """``(..., embedding_dim) -> (..., embedding_dim)``."""
        return self.lin2(self.act(self.lin1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection ``(B, C_in, H, W) -> (B, H/p, W/p, C)`` (channels-last).

    Args:
        patch_size: patch side ``p`` (kernel = stride).
        in_chans: input channels.
        embed_dim: token width ``C``.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, H/p, W/p, C)``."""
        return self.proj(x).permute(0, 2, 3, 1)


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """Linearly interpolate a relative position table ``(L, D)`` to ``(length, D)`` along ``L`` (no-op if equal).

    Args:
        table: ``(L, D)``, one row per relative offset ``-(L-1)/2 .. (L-1)/2``.
        length: the number of offsets needed.
    """
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype)


def _rel_pos_lookup(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Rows of ``table`` for every (query, key) position pair along one axis: ``(q_size, k_size, D)``.

    When query and key lengths differ, the shorter axis' coordinates are stretched to the longer one (as in MViTv2).
    """
    needed = 2 * max(q_size, k_size) - 1
    table = resize_rel_pos(table, needed)
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=table.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale
    return table[offsets.long()]


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> Tensor:
    """Decomposed relative position bias of MViTv2 (arXiv:2112.01526), added to the attention logits.

    ``bias[n, (i, j), (k, l)] = q[n, (i, j)] . R_h[i - k] + q[n, (i, j)] . R_w[j - l]``.

    Args:
        q: queries ``(N, q_h * q_w, D)`` (not scaled).
        rel_pos_h: table ``(L_h, D)`` along the rows.
        rel_pos_w: table ``(L_w, D)`` along the columns.
        q_size: ``(q_h, q_w)``.
        k_size: ``(k_h, k_w)``.

    Returns:
        ``(N, q_h * q_w, k_h * k_w)``.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    r_h = _rel_pos_lookup(q_h, k_h, rel_pos_h).to(q.dtype)  # (q_h, k_h, D)
    r_w = _rel_pos_lookup(q_w, k_w, rel_pos_w).to(q.dtype)  # (q_w, k_w, D)
    grid_q = q.reshape(q.shape[0], q_h, q_w, q.shape[-1])
    bias_h = torch.einsum("nijd,ikd->nijk", grid_q, r_h)
    bias_w = torch.einsum("nijd,jld->nijl", grid_q, r_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (N, q_h, q_w, k_h, k_w)
    return bias.reshape(q.shape[0], q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, h, w, C)`` token grid, optionally with decomposed relative positions.

    Args:
        dim: token width ``C``.
        num_heads: attention heads (``C`` must be divisible by it).
        qkv_bias: bias in the fused query/key/value projection.
        use_rel_pos: add the decomposed relative position bias.
        input_size: the ``(h, w)`` grid the relative position tables are sized for (``2h-1``, ``2w-1`` rows).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, h, w, C) -> (B, h, w, C)``."""
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, D) each
        bias = None
        if self.use_rel_pos:
            flat_q = q.reshape(b * self.num_heads, n, -1)
            bias = decomposed_rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            bias = bias.reshape(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(D), as SAM
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut ``(B, h, w, C)`` into non-overlapping windows, zero-padding ``h, w`` up to multiples of the window.

    Returns:
        ``(B * n_windows, window, window, C)`` and the padded grid ``(h_p, w_p)``.
    """
    b, h, w, c = x.shape
    pad_h = -h % window_size
    pad_w = -w % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * n_windows, window, window, C) -> (B, h, w, C)``, padding cut."""
    hp, wp = padded_hw
    h, w = hw
    n_h, n_w = hp // window_size, wp // window_size
    b = windows.shape[0] // (n_h * n_w)
    x = windows.reshape(b, n_h, n_w, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block on a ``(B, h, w, C)`` grid: windowed (``window_size > 0``) or global attention.

    Args:
        dim: token width ``C``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``C``.
        qkv_bias: bias in the query/key/value projection.
        use_rel_pos: decomposed relative position bias.
        window_size: attention window side; 0 = global attention over the whole grid.
        input_size: the encoder's token grid ``(h, w)``; sizes the relative position tables of global blocks
            (windowed blocks use ``(window_size, window_size)``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        """``(B, h, w, C) -> (B, h, w, C)``."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: ``(B, 3, H, W) -> (B, out_chans, H/16, W/16)``.

    Patch embedding + absolute position embedding, ``depth`` blocks (global attention at ``global_attn_indexes``,
    ``window_size`` windows elsewhere), then a neck of 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d. Defaults are
    SAM ViT-B at 1024x1024 (arXiv:2304.02643).

    Args:
        img_size: the square input side the position embedding and global rel-pos tables are sized for.
        patch_size: patch side (16).
        in_chans: image channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        out_chans: neck output channels.
        qkv_bias: bias in the query/key/value projections.
        use_abs_pos: learn an absolute position embedding ``(1, img/16, img/16, embed_dim)``.
        use_rel_pos: decomposed relative position bias in every block.
        window_size: window side of the windowed blocks.
        global_attn_indexes: indices of the blocks with global attention.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.global_attn_indexes = tuple(global_attn_indexes)
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in self.global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding plus position embedding: ``(B, 3, H, W) -> (B, H/16, W/16, embed_dim)``.

        A token grid other than the one the encoder was built for gets the position embedding resized bicubically.
        """
        tokens = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != tokens.shape[1:3]:
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2), size=tokens.shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            tokens = tokens + pos
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, out_chans, H/16, W/16)``: :meth:`embed`, the blocks, then the neck."""
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.neck(tokens.permute(0, 3, 1, 2))
