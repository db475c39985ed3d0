"""2D neighbourhood attention in plain PyTorch (no NATTEN), with a relative-position bias.

Neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", arXiv:2204.07143) lets each query
attend to the ``k x k`` keys around it. This module reproduces the semantics of NATTEN 0.17's
``NeighborhoodAttention2D`` with dilation 1, non-causal, ``rel_pos_bias=True`` (the layer MedViTV2 was trained with),
so its state dicts load unchanged (parameter names ``qkv``, ``rpb``, ``proj``):

* On an axis of length ``L >= k`` (``n = k // 2``), query ``i`` attends to positions ``s(i) ... s(i) + k - 1`` with
  ``s(i) = clamp(i - n, 0, L - k)``: at the borders the window shifts inward instead of being padded, so every query
  sees exactly ``k * k`` keys.
* The logit of neighbour ``(r, c)`` of query ``(i, j)`` is ``(q * d**-0.5) . k + rpb[head, r - i + k - 1,
  c - j + k - 1]``; softmax over the ``k * k`` neighbours; the output is the weighted sum of the values, then a
  Linear projection.

The computation is tiled (see :func:`neighborhood_attention_2d`): ``t x t`` query tiles attend densely to the
``(t + k - 1)^2`` keys around them with ``-inf`` outside each window, so memory is about ``(t + k - 1)^2 / t^2``
(3.4x at ``t = k = 7``) times that of the keys, not ``k^2`` times, and cost grows linearly with the map size. Maps
smaller than the kernel are refused, as NATTEN 0.17 refuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ModelInputError

__all__ = ["NeighborhoodAttention2D", "neighborhood_attention_2d", "neighborhood_indices"]

# Query tile side tried first: measured fastest on CPU for the 56/28/14 maps of a 224 px MedViTV2 input.
_PREFERRED_TILE = 7


def neighborhood_indices(length: int, kernel_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Neighbour positions and relative-bias indices along one axis.

    Args:
        length: axis length ``L`` (``>= kernel_size``).
        kernel_size: odd window size ``k``.
        device: device of the returned tensors.

    Returns:
        ``(positions, bias_index)``, both ``(L, k)`` int64: ``positions[i, a] = s(i) + a`` and
        ``bias_index[i, a] = positions[i, a] - i + k - 1`` (the column of the ``2k - 1`` wide bias table).
    """
    i = torch.arange(length, device=device)
    start = (i - kernel_size // 2).clamp(0, length - kernel_size)
    positions = start[:, None] + torch.arange(kernel_size, device=device)[None, :]
    return positions, positions - i[:, None] + (kernel_size - 1)


def _check_map(height: int, width: int, kernel_size: int) -> None:
    if height < kernel_size or width < kernel_size:
        raise ModelInputError(
            f"neighbourhood attention: a {height}x{width} feature map is smaller than the {kernel_size}x{kernel_size}"
            " kernel",
            expected=f"feature maps of at least {kernel_size}x{kernel_size}",
            hint="use a larger input image (see the model card's min_size)",
        )


def _block_size(length: int, kernel_size: int) -> int:
    """Query tile side ``t`` along an axis of ``length`` for :func:`neighborhood_attention_2d`.

    Tile ``r`` holds queries ``r * t ... r * t + t - 1`` and reads keys ``r * t - n ... r * t + t + n - 1``
    (``n = k // 2``, zero padding outside the map). That strip holds every shifted window of the tile when
    ``t >= n + 1`` and the last tile starts at or before ``L - n - 1`` (``L % t == 0`` or ``L % t >= n + 1``).
    Among those sizes (at least 7, measured fastest on CPU) the one reading the fewest keys per axis is taken.
    """
    n = kernel_size // 2
    best, best_cost = length, None
    for t in range(max(n + 1, min(_PREFERRED_TILE, length)), length + 1):
        if length % t and length % t < n + 1:
            continue
        cost = -(-length // t) * t * (t + 2 * n)
        if best_cost is None or cost < best_cost:
            best, best_cost = t, cost
    return best


def _tile_plan(length: int, kernel_size: int, tile: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Window mask and bias columns of every (query, key) pair of the tiles along one axis.

    Returns:
        ``(valid, bias_index)``, both ``(nb, t, t + 2n)``: whether key ``j`` of tile ``r``'s strip is in the window
        of the tile's query ``i``, and its column in the ``2k - 1`` wide bias table (clamped where not valid).
        Queries past the end of the axis (padding) reuse the last query's window, so their logits stay finite.
    """
    n = kernel_size // 2
    nb = -(-length // tile)
    query = torch.arange(nb * tile, device=device).clamp(max=length - 1).reshape(nb, tile)
    start = (query - n).clamp(0, length - kernel_size)
    key = (torch.arange(nb, device=device) * tile - n)[:, None] + torch.arange(tile + 2 * n, device=device)
    offset = key[:, None, :] - start[:, :, None]
    bias_index = (key[:, None, :] - query[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    return (offset >= 0) & (offset < kernel_size), bias_index


def neighborhood_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Neighbourhood attention of already scaled queries.

    The map is cut into ``t x t`` query tiles; each tile attends densely to the ``(t + 2n) x (t + 2n)`` strip of
    keys around it (an ``unfold`` view of the zero-padded keys) with ``-inf`` added outside every query's window,
    so the work is a few batched matrix products instead of a ``k * k``-fold copy of keys and values.

    Args:
        q: scaled queries ``(B, heads, H, W, d)``.
        k: keys ``(B, heads, H, W, d)``.
        v: values ``(B, heads, H, W, d)``.
        rpb: relative-position bias ``(heads, 2k - 1, 2k - 1)`` or ``None``.
        kernel_size: odd window size ``k`` (``H, W >= k``).
        attn_drop: dropout probability on the attention weights.
        training: apply the dropout.

    Returns:
        ``(B, heads, H, W, d)``.
    """
    b, heads, h, w, d = q.shape
    _check_map(h, w, kernel_size)
    n = kernel_size // 2
    th, tw = _block_size(h, kernel_size), _block_size(w, kernel_size)
    valid_h, bias_h = _tile_plan(h, kernel_size, th, q.device)
    valid_w, bias_w = _tile_plan(w, kernel_size, tw, q.device)
    nbh, nbw, sh, sw = valid_h.shape[0], valid_w.shape[0], th + 2 * n, tw + 2 * n
    hp, wp = nbh * th, nbw * tw
    # (nbh, th, sh, nbw, tw, sw) -> (nbh, nbw, th * tw, sh * sw): tile, query in tile, key in strip
    valid = (valid_h[:, :, :, None, None, None] & valid_w[None, None, None]).permute(0, 3, 1, 4, 2, 5)
    valid = valid.reshape(nbh, nbw, th * tw, sh * sw)
    if rpb is None:
        bias = torch.zeros(heads, *valid.shape, dtype=q.dtype, device=q.device)
    else:
        bias = rpb[:, bias_h[:, :, :, None, None, None], bias_w[None, None, None]].permute(0, 1, 4, 2, 5, 3, 6)
        bias = bias.reshape(heads, *valid.shape)
    bias = bias.masked_fill(~valid, float("-inf"))  # (heads, nbh, nbw, th * tw, sh * sw)

    queries = F.pad(q, (0, 0, 0, wp - w, 0, hp - h)).reshape(b, heads, nbh, th, nbw, tw, d)
    queries = queries.transpose(3, 4).reshape(b, heads, nbh, nbw, th * tw, d)

    def strips(t: Tensor) -> Tensor:
        # (B, n, H, W, d) -> zero-padded (B, n, hp + 2n, wp + 2n, d) -> (B, n, nbh, nbw, sh * sw, d)
        t = F.pad(t, (0, 0, n, n + wp - w, n, n + hp - h)).unfold(2, sh, th).unfold(3, sw, tw)
        return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, heads, nbh, nbw, sh * sw, d)

    logits = queries @ strips(k).transpose(-1, -2)  # (B, n, nbh, nbw, th * tw, sh * sw)
    logits = logits + bias.to(logits.dtype)
    attn = F.dropout(logits.softmax(dim=-1), p=attn_drop, training=training)
    out = (attn @ strips(v).to(attn.dtype)).reshape(b, heads, nbh, nbw, th, tw, d)
    return out.transpose(3, 4).reshape(b, heads, hp, wp, d)[:, :, :h, :w]


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2D neighbourhood attention on channels-last maps ``(B, H, W, C)``.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (``C`` divisible by it).
        kernel_size: odd neighbourhood size ``k``.
        qkv_bias: bias of the ``qkv`` projection.
        rel_pos_bias: learn a relative-position bias ``rpb`` ``(heads, 2k - 1, 2k - 1)``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.

    Examples::

        >>> na = NeighborhoodAttention2D(64, num_heads=2, kernel_size=7)
        >>> na(torch.randn(1, 9, 13, 64)).shape
        torch.Size([1, 9, 13, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        qkv_bias: bool = True,
        rel_pos_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb: nn.Parameter | None = None
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """Attend within each ``k x k`` neighbourhood of ``x`` ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        b, h, w, c = x.shape
        _check_map(h, w, self.kernel_size)
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)  # each (B, heads, H, W, d)
        out = neighborhood_attention_2d(
            q * self.scale, k, v, self.rpb, self.kernel_size, attn_drop=self.attn_drop.p, training=self.training
        )  # (B, heads, H, W, d)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}"
