"""Multi-scale deformable attention in pure PyTorch (``grid_sample`` form).

Paper: X. Zhu, W. Su, L. Lu, B. Li, X. Wang, J. Dai, "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021, arXiv:2010.04159 (Eq. 3, multi-scale deformable attention).

Each query looks at ``n_points`` locations per head and per feature level, placed around its reference point by
learned offsets, and returns the attention-weighted sum of the bilinearly sampled values:

    MSDeformAttn(z_q, p_q, {x_l}) = W_o sum_h [ sum_l sum_k A_hlqk * W_v x_l(p_q,l + dp_hlqk / (W_l, H_l)) ]

where ``A`` is softmax-normalised over the ``n_levels * n_points`` samples of a head. The CUDA kernel of the paper
computes exactly the same numbers; this module uses ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` on each level, so it runs on any device (at the cost of more memory). Locations are normalised
to ``[0, 1]`` with ``(0, 0)`` the top-left corner of the top-left pixel and ``(1, 1)`` the bottom-right corner of the
bottom-right pixel, as ``align_corners=False`` assumes.

Initialisation follows the paper: the offset projection has zero weights and a bias that points head ``h`` in
direction ``2 pi h / n_heads`` (normalised so the larger coordinate is 1) at distances 1, 2, ..., ``n_points``
pixels; the attention-weight projection is zero (uniform weights at start); value and output projections are
Xavier-uniform with zero bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "deform_inputs", "ms_deform_attn_sample", "reference_points"]


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Bilinear sampling and weighted sum of multi-scale deformable attention.

    Args:
        value: per-head values ``(B, sum_l H_l * W_l, n_heads, D)``, levels concatenated in order.
        spatial_shapes: ``(H_l, W_l)`` of each level.
        sampling_locations: ``(B, Lq, n_heads, n_levels, n_points, 2)`` as ``(x, y)`` normalised to ``[0, 1]``.
        attention_weights: ``(B, Lq, n_heads, n_levels, n_points)``, normalised over levels and points.

    Returns:
        ``(B, Lq, n_heads * D)``: the weighted sum of the sampled values (zero outside the maps).
    """
    b, _, n_heads, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, heads, D) -> (B*heads, D, H, W)
        value_l = values[level].flatten(2).transpose(1, 2).reshape(b * n_heads, d, h, w)
        # (B, Lq, heads, P, 2) -> (B*heads, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads, D, Lq, L*P) weighted by (B*heads, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(b * n_heads, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(b, n_heads * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (arXiv:2010.04159).

    Args:
        d_model: channel width ``C`` of queries and values.
        n_levels: number of value feature levels.
        n_heads: attention heads (``C`` must be divisible by it).
        n_points: sampling points per head and level.

    Examples::

        >>> attn = MSDeformAttn(768, n_levels=5, n_heads=12, n_points=4)  # 1,734,864 parameters
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets fan out in ``n_heads`` directions, uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], dim=-1)
        grid = grid / grid.abs().max(dim=-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, self.n_points, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid * scale).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """Attend from ``query`` to the multi-level ``value`` maps.

        Args:
            query: ``(B, Lq, C)``.
            reference_points: ``(B, Lq, n_levels, 2)`` as ``(x, y)`` normalised to ``[0, 1]`` (see
                :func:`reference_points`).
            value: ``(B, sum_l H_l * W_l, C)``, the flattened levels concatenated in order.
            spatial_shapes: ``(n_levels, 2)`` long tensor of ``(H_l, W_l)``.
            level_start_index: ``(n_levels,)`` long tensor, offset of each level in ``value``.

        Returns:
            ``(B, Lq, C)``.
        """
        b, lq, c = query.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        if len(shapes) != self.n_levels or value.shape[1] != sum(h * w for h, w in shapes):
            raise ValueError(
                f"value has {value.shape[1]} tokens on {len(shapes)} levels {shapes}, "
                f"expected {self.n_levels} levels whose H*W sum to the token count"
            )
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        if level_start_index.tolist() != starts:
            raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial shapes {shapes}")
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(b, value.shape[1], heads, c // heads)
        offsets = self.sampling_offsets(query).view(b, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, lq, heads, levels * points).softmax(-1)
        weights = weights.view(b, lq, heads, levels, points)
        normaliser = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], dim=-1).to(offsets.dtype)  # (W, H)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = ms_deform_attn_sample(v, shapes, locations.to(v.dtype), weights.to(v.dtype))
        return self.output_proj(out)


def reference_points(
    query_shapes: Sequence[tuple[int, int]], n_levels: int, batch: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Pixel-centre reference points of the queries, shared by every value level.

    The query of pixel ``(y, x)`` on a level of size ``(H, W)`` gets ``((x + 0.5) / W, (y + 0.5) / H)``, i.e. the same
    relative position on every value level (ViT-Adapter's reference grid, arXiv:2205.08534).

    Args:
        query_shapes: ``(H, W)`` of each query level, in the order their tokens are concatenated.
        n_levels: number of value levels to broadcast over.
        batch: batch size ``B`` of the result.
        device: device of the result.

    Returns:
        ``(B, sum H * W, n_levels, 2)`` as ``(x, y)`` in ``[0, 1]``.
    """
    points = []
    for h, w in query_shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))
    ref = torch.cat(points, dim=0)
    return ref[None, :, None, :].expand(batch, -1, n_levels, -1)


def deform_inputs(
    value_shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """``spatial_shapes`` ``(n_levels, 2)`` and ``level_start_index`` ``(n_levels,)`` long tensors of value levels."""
    shapes = torch.as_tensor([list(s) for s in value_shapes], dtype=torch.long, device=device)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    return shapes, starts
