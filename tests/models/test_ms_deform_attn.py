"""Multi-scale deformable attention: sizes, the paper's init, and the sampling core against brute-force bilinear."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.models.layers.ms_deform_attn import MSDeformAttn, deform_inputs, ms_deform_attn_sample, reference_points


def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of ``value`` ``(D, H, W)`` at normalised ``(x, y)``, zero outside (align_corners=False)."""
    _, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[0], dtype=value.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * value[:, yy, xx]
    return out


def identity_attn(d_model: int, n_levels: int, n_heads: int, n_points: int) -> MSDeformAttn:
    attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(d_model))
            lin.bias.zero_()
    return attn


def test_parameter_count_of_the_db_sam_block() -> None:
    n = sum(p.numel() for p in MSDeformAttn(768, n_levels=5, n_heads=12, n_points=4).parameters())
    assert n == 1_734_864
    assert abs(n - 1.73e6) <= 0.02 * 1.73e6


def test_init_points_heads_in_their_directions_with_uniform_weights() -> None:
    attn = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 -> +x, head 1 -> +y, head 2 -> -x, head 3 -> -y; point k at distance k + 1 on every level
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):
        torch.testing.assert_close(bias[:, 0, k], directions * (k + 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, 1, k], directions * (k + 1), atol=1e-6, rtol=0)
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()


def test_sampling_core_matches_brute_force_bilinear() -> None:
    gen = torch.Generator().manual_seed(0)
    h, w, d, lq = 3, 5, 2, 7
    value = torch.randn(1, h * w, 1, d, generator=gen, dtype=torch.float64)
    # locations inside, on the border and outside the map
    locations = torch.rand(1, lq, 1, 1, 1, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.ones(1, lq, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_sample(value, [(h, w)], locations, weights)
    assert out.shape == (1, lq, d)
    grid = value[0, :, 0].T.reshape(d, h, w)
    for q in range(lq):
        x, y = locations[0, q, 0, 0, 0].tolist()
        torch.testing.assert_close(out[0, q], bilinear(grid, x, y))


def test_module_with_known_offsets_matches_brute_force() -> None:
    torch.manual_seed(0)
    h, w, d = 4, 6, 3
    attn = identity_attn(d, n_levels=1, n_heads=1, n_points=1)
    offset = (0.75, -1.25)  # pixels (x, y)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor(offset))
    value = torch.randn(2, h * w, d)
    shapes, starts = deform_inputs([(h, w)])
    ref = reference_points([(h, w)], n_levels=1, batch=2)
    out = attn(value, ref, value, shapes, starts)
    assert out.shape == (2, h * w, d)
    for b in range(2):
        grid = value[b].T.reshape(d, h, w)
        for q in range(h * w):
            x, y = ref[b, q, 0].tolist()
            expected = bilinear(grid, x + offset[0] / w, y + offset[1] / h)
            torch.testing.assert_close(out[b, q], expected, atol=1e-5, rtol=1e-5)


def test_uniform_weights_average_the_levels_at_pixel_centres() -> None:
    torch.manual_seed(0)
    d = 4
    attn = identity_attn(d, n_levels=2, n_heads=2, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    levels = [(2, 3), (2, 3)]
    value = torch.randn(1, 12, d)
    shapes, starts = deform_inputs(levels)
    assert shapes.tolist() == [[2, 3], [2, 3]] and starts.tolist() == [0, 6]
    out = attn(value[:, :6], reference_points([(2, 3)], n_levels=2), value, shapes, starts)
    torch.testing.assert_close(out, 0.5 * (value[:, :6] + value[:, 6:]))


def test_reference_points_are_pixel_centres_for_every_level() -> None:
    ref = reference_points([(2, 2), (1, 2)], n_levels=3, batch=2)
    assert ref.shape == (2, 6, 3, 2)
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.25, 0.5], [0.75, 0.5]])
    for level in range(3):
        torch.testing.assert_close(ref[1, :, level], expected)


def test_gradients_and_rejected_layouts() -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(16, n_levels=2, n_heads=2, n_points=2)
    levels = [(4, 4), (2, 2)]
    shapes, starts = deform_inputs(levels)
    query = torch.randn(2, 16, 16, requires_grad=True)
    value = torch.randn(2, 20, 16, requires_grad=True)
    out = attn(query, reference_points([(4, 4)], 2, batch=2), value, shapes, starts)
    assert out.shape == (2, 16, 16)
    out.square().mean().backward()
    assert query.grad is not None and value.grad is not None
    assert all(p.grad is not None for p in attn.parameters())
    with pytest.raises(ValueError, match="level_start_index"):
        attn(query, reference_points([(4, 4)], 2, batch=2), value, shapes, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="levels"):
        attn(query, reference_points([(4, 4)], 2, batch=2), value[:, :18], shapes, starts)
