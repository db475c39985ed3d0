"""SAM intensity scaling, the SAM frame (resize longest side + pad) and training box derivation / jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from medseg.transforms.sam import (
    BOX_JITTER,
    SamFrame,
    box_from_mask,
    box_rule_of,
    enlarge_box,
    prepare_mask,
    prepare_slice,
    sam_intensity,
    shift_box,
    slice_to_volume,
    volume_slice,
)


def test_grey_image_shares_one_scale_across_slices() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 10, 12, 4, generator=gen) * 1000 - 200
    image[..., 0] *= 0.01  # a dark slice must stay dark (no per-slice rescaling)
    out = sam_intensity(image)
    assert out.shape == (3, 10, 12, 4) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(255.0)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert float(out[..., 0].max()) < 0.6 * float(out[..., 1:].max())
    lo, hi = np.percentile(image.numpy(), (0.5, 99.5))
    expected = (image.clamp(float(lo), float(hi)) - lo) / (hi - lo) * 255
    torch.testing.assert_close(out[0], expected[0].float(), atol=1e-3, rtol=1e-4)


def test_rgb_in_byte_range_is_kept_and_other_rgb_is_scaled() -> None:
    gen = torch.Generator().manual_seed(1)
    photo = torch.randint(0, 256, (3, 8, 6, 1), generator=gen).float()
    kept = sam_intensity(MetaTensor(photo, affine=torch.eye(4)))
    assert type(kept) is torch.Tensor and torch.equal(kept, photo)
    wide = torch.randn(3, 8, 6, 1, generator=gen) * 400
    out = sam_intensity(wide)
    assert out.shape == (3, 8, 6, 1) and 0.0 <= float(out.min()) and float(out.max()) <= 255.0
    assert float(out.max()) == pytest.approx(255.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_constant_image_gives_zeros_without_division_by_zero(channels: int) -> None:
    out = sam_intensity(torch.full((channels, 5, 4, 3), -7.0))
    assert out.shape == (3, 5, 4, 3) and torch.isfinite(out).all() and not out.any()


def test_other_channel_counts_are_refused() -> None:
    with pytest.raises(ModelInputError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        sam_intensity(torch.zeros(2, 4, 4, 1))


def test_volume_slice_is_the_transposed_slice_and_inverts() -> None:
    vol = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    s = volume_slice(vol, 2)
    assert s.shape == (2, 4, 3)  # (C, rows=Y, cols=X)
    assert s[1, 3, 0] == vol[1, 0, 3, 2]  # row y=3, column x=0
    assert torch.equal(slice_to_volume(s), vol[..., 2])


def test_frame_sizes_for_a_non_square_slice() -> None:
    frame = SamFrame.for_slice(rows=30, cols=50, size=64)
    assert frame.scale == pytest.approx(64 / 50)
    assert (frame.new_rows, frame.new_cols) == (38, 64)  # int(30 * 1.28 + 0.5)


def test_prepare_slice_normalises_and_zero_pads() -> None:
    image = torch.full((3, 30, 50), 255.0)
    x, frame = prepare_slice(image, 64)
    assert x.shape == (3, 64, 64)
    mean, std = torch.tensor(SAM_PIXEL_MEAN), torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(x[:, 10, 20], (255.0 - mean) / std)
    assert not x[:, frame.new_rows :, :].any()
    tall, tall_frame = prepare_slice(torch.full((3, 50, 30), 255.0), 64)
    assert (tall_frame.new_rows, tall_frame.new_cols) == (64, 38) and not tall[:, :, 38:].any()


@pytest.mark.parametrize(("rows", "cols"), [(30, 50), (48, 20), (64, 64), (100, 130)])
def test_box_and_logits_round_trip_through_the_frame(rows: int, cols: int) -> None:
    size = 64
    frame = SamFrame.for_slice(rows, cols, size)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    x0, y0, x1, y1 = cols // 5, rows // 4, cols // 2, (3 * rows) // 4
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    # the model-frame mask's extent agrees with the mapped box to within one model pixel
    in_model = prepare_mask(mask, size)
    assert in_model.dtype == torch.bool and in_model.shape == (size, size)
    model_box = torch.tensor(box_from_mask(in_model), dtype=torch.float32)
    torch.testing.assert_close(frame.box_to_model((x0, y0, x1, y1)), model_box, atol=1.01, rtol=0)
    # logits drawn in the model frame come back onto the same pixels; the padding never leaks in
    logits = torch.where(in_model, 10.0, -10.0)
    logits[frame.new_rows :, :] = 50.0
    logits[:, frame.new_cols :] = 50.0
    back = frame.logits_to_slice(logits[None, None])
    assert back.shape == (1, 1, rows, cols)
    agree = ((back[0, 0] > 0) == mask).float().mean()
    assert float(agree) > 0.97
    assert not (back[0, 0, rows - 1, :] > 0).any() and not (back[0, 0, :, cols - 1] > 0).any()


def test_points_map_pixel_centres() -> None:
    frame = SamFrame.for_slice(rows=32, cols=16, size=64)  # scale 2 on both axes
    out = frame.points_to_model([[0, 0], [15, 31], [7.5, 15.5]])
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [30.5, 62.5], [15.5, 31.5]]))
    torch.testing.assert_close(frame.box_to_model((0, 0, 15, 31)), torch.tensor([0.5, 0.5, 30.5, 62.5]))
    identity = SamFrame.for_slice(rows=64, cols=64, size=64)
    torch.testing.assert_close(identity.points_to_model([[3.0, 9.0]]), torch.tensor([[3.0, 9.0]]))


def test_prepare_mask_keeps_labels_and_dtype() -> None:
    mask = torch.zeros(16, 8, dtype=torch.uint8)
    mask[2:6, 1:3] = 3
    out = prepare_mask(mask, 32)
    assert out.dtype == torch.uint8 and out.shape == (32, 32)
    assert set(out.unique().tolist()) == {0, 3} and int((out == 3).sum()) == 4 * 2 * 4
    assert not out[:, 16:].any()


def test_box_from_mask_picks_the_largest_8_connected_component() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:5, 2:5] = True  # a compact 3 x 3 blob: 9 pixels
    mask[12, 14:16] = True  # 2 pixels
    assert box_from_mask(mask) == (2, 2, 4, 4)
    for i in range(10):  # a diagonal of 10 pixels: one component only with 8-connectivity
        mask[8 + i, 18 + i] = True
    assert box_from_mask(mask) == (18, 8, 27, 17)
    assert box_from_mask(mask, "all_pixels") == (2, 2, 27, 17)
    assert box_from_mask(mask, "largest_component") == (18, 8, 27, 17)
    assert box_from_mask(np.zeros((4, 4), dtype=bool)) is None
    assert box_from_mask(torch.ones(3, 5, dtype=torch.bool)) == (0, 0, 4, 2)


def test_enlarge_box_bounds_and_range_over_seeds() -> None:
    box, rows, cols = (100, 60, 150, 120), 256, 256
    deltas = []
    for seed in range(400):
        x0, y0, x1, y1 = enlarge_box(box, rows, cols, np.random.default_rng(seed))
        deltas.append((box[0] - x0, box[1] - y0, x1 - box[2], y1 - box[3]))
    d = np.array(deltas)
    assert d.min() == 0 and d.max() == 19  # U{0..19} on the 256 grid, each side independently
    assert len({tuple(r) for r in d}) > 300
    # a 512-wide, 128-high slice: x moves in steps of 2 pixels, y in steps of 0.5 (rounded)
    wide = np.array([enlarge_box((200, 50, 300, 70), 128, 512, np.random.default_rng(s)) for s in range(300)])
    assert (200 - wide[:, 0]).max() <= 38 and (wide[:, 2] - 300).max() <= 38 and (200 - wide[:, 0]).max() >= 30
    assert (50 - wide[:, 1]).max() <= 10
    # clipped to the slice near its border
    edge = np.array([enlarge_box((0, 1, 30, 62), 64, 64, np.random.default_rng(s)) for s in range(100)])
    assert edge[:, 0].min() == 0 and edge[:, 1].min() == 0 and edge[:, 3].max() == 63
    assert edge[:, 2].max() == 35  # 30 + round(19 * 64 / 256)


def test_shift_box_rule_over_seeds() -> None:
    box = (40, 40, 60, 70)  # w = 20, h = 30: m = min(5, 10) = 5
    shifted = np.array([shift_box(box, 256, 256, np.random.default_rng(s)) for s in range(400)])
    dx, dy = shifted[:, 0] - 40, shifted[:, 1] - 40
    assert dx.min() == -5 and dx.max() == 4 and dy.min() == -5 and dy.max() == 4
    assert np.array_equal(shifted[:, 2] - shifted[:, 0], np.full(400, 20))  # translated, not resized
    small = np.array([shift_box((10, 10, 14, 30), 64, 64, np.random.default_rng(s)) for s in range(200)])
    assert np.abs(small[:, 0] - 10).max() <= 2 and small[:, 0].min() == 8  # m = int(0.5 * 4) = 2
    assert shift_box((5, 5, 6, 9), 64, 64, np.random.default_rng(0)) == (5, 5, 6, 9)  # m = 0: kept
    corner = np.array([shift_box((0, 0, 20, 20), 32, 32, np.random.default_rng(s)) for s in range(100)])
    assert corner.min() >= 0 and corner.max() <= 31
    assert set(BOX_JITTER) == {"enlarge", "shift"} and BOX_JITTER["shift"] is shift_box


def test_box_rules_are_declared_by_the_models() -> None:
    from medseg.models.db_sam import DBSAM
    from medseg.models.sam_unet import SAMUNet

    assert box_rule_of(DBSAM) == "all_pixels"  # DB-SAM / MedSAM: bbox(mask > 0)
    assert box_rule_of(SAMUNet) == "largest_component"  # SAM-Med2D / SAM-UNet
    assert box_rule_of(object()) == "largest_component"
    with pytest.raises(ConfigError, match="did you mean 'all_pixels'"):
        box_from_mask(np.ones((3, 3), bool), "all_pixel")
