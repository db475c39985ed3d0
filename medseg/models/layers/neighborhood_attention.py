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

The neighbourhoods are gathered with index tensors built from ``s(i)`` (memory ``B * heads * H * W * k^2 * d``), so
cost grows linearly with the map size. Maps smaller than the kernel are refused, as NATTEN 0.17 refuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ModelInputError

__all__ = ["NeighborhoodAttention2D", "neighborhood_attention_2d", "neighborhood_indices"]


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
    rows, bias_rows = neighborhood_indices(h, kernel_size, q.device)
    cols, bias_cols = neighborhood_indices(w, kernel_size, q.device)
    kk = kernel_size * kernel_size

    def gather(t: Tensor) -> Tensor:
        # (B, n, H, W, d) -> (B, n, H, k, W, d) -> (B, n, H, k, W, k, d) -> (B, n, H, W, k*k, d), row-major window
        t = t[:, :, rows][:, :, :, :, cols]
        return t.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, h, w, kk, d)

    logits = (q.unsqueeze(-2) @ gather(k).transpose(-1, -2)).squeeze(-2)  # (B, n, H, W, k*k)
    if rpb is not None:
        bias = rpb[:, bias_rows[:, None, :, None], bias_cols[None, :, None, :]]  # (n, H, W, k, k)
        logits = logits + bias.reshape(heads, h, w, kk).to(logits.dtype)
    attn = F.dropout(logits.softmax(dim=-1), p=attn_drop, training=training)
    return (attn.unsqueeze(-2) @ gather(v)).squeeze(-2)


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
