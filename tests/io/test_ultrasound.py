"""Ultrasound: region calibration, crop and restore, colour rule, cine loops, real files and bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom import examples
from pydicom.data import get_testdata_file

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io import get_adapter, load_image, load_ultrasound, read_header
from medseg.transforms.presets import intensity
from tests.io.modality_files import region, write_us

LUMA = np.asarray([0.299, 0.587, 0.114])


def pydicom_data(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def rgb_frames(path: Path) -> np.ndarray:
    """The file's frames ``(T, rows, cols, 3)`` as pydicom decodes them (palette through its LUT)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = pydicom.pixels.apply_color_lut(pixels, ds)
    return pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]


def region_spacing(path: Path, index: int) -> tuple[float, float]:
    item = pydicom.dcmread(path, stop_before_pixels=True).SequenceOfUltrasoundRegions[index]
    return 10 * abs(float(item.PhysicalDeltaX)), 10 * abs(float(item.PhysicalDeltaY))


def test_ybr_cine_is_cropped_calibrated_and_timed() -> None:
    path = Path(examples.get_path("ybr_color"))  # 30 frames 240 x 320, one region with bounds beyond the image
    img = load_ultrasound(path)
    assert tuple(img.shape) == (1, 320 - 84, 240 - 31, 30)  # box clipped to columns 84..319, rows 31..239
    meta = img.meta
    assert meta["crop_box"] == [84, 31, 319, 239] and meta["us_region"]["stated_box"] == [84, 31, 595, 414]
    sx, sy = region_spacing(path, 0)
    np.testing.assert_array_equal(np.diag(img.affine.numpy()), [sx, sy, 1.0, 1.0])
    np.testing.assert_allclose(img.affine.numpy()[:2, 3], [84 * sx, 31 * sy])  # the crop keeps mm positions
    assert meta["spacing_calibrated"] and meta["us_region_choice"] == "only"
    assert meta["frame_time_source"] == "FrameTime"
    np.testing.assert_allclose(meta["frame_times_ms"], [33.333 * k for k in range(30)])
    assert meta["colour"] == "luminance" and not meta["colour_flow"]  # tissue region, no colour flag
    luma = (rgb_frames(path)[:, 31:240, 84:320].astype(np.float64) @ LUMA).transpose(2, 1, 0)
    np.testing.assert_allclose(img[0].numpy(), luma, atol=1e-3)
    assert meta["number_of_frames"] == 30 and meta["sop_class"] == "US Multi-frame Image"


def test_palette_keeps_colour_flow_and_restores_the_full_frame() -> None:
    path = Path(examples.get_path("palette_color"))  # tissue region + ECG trace region; colour data flag set
    img = load_image(path)
    assert img.meta["modality_adapter"] == "ultrasound" and img.meta["colour"] == "rgb"
    assert [r["index"] for r in img.meta["us_regions"]] == [0]  # the ECG trace (format 4) is not a tissue region
    assert img.meta["crop_box"] == [120, 60, 799, 349]
    assert tuple(img.shape) == (3, 680, 290, 1)
    np.testing.assert_array_equal(
        img[..., 0].numpy(), rgb_frames(path)[0, 60:350, 120:800].transpose(2, 1, 0).astype(np.float32)
    )
    mask = (img[0].numpy() > 100).astype(np.uint8)
    full = get_adapter("ultrasound").restore_mask(torch.as_tensor(mask)[None], img.meta)
    assert full.shape == (800, 350, 1) and full.dtype == np.uint8
    np.testing.assert_array_equal(full[120:800, 60:350], mask)  # crop / restore round trip is exact
    assert full.sum() == mask.sum()  # zero outside the box
    with pytest.raises(ModelInputError, match="crop box"):
        get_adapter("ultrasound").restore_mask(mask[1:], img.meta)
    header = read_header(path)
    assert header.shape == (680, 290, 1) and header.channels == 3


def test_rgb_without_region_is_uncalibrated_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    path = Path(examples.get_path("rgb_color"))  # power Doppler, no region at all
    with caplog.at_level(logging.WARNING, logger="medseg.io.ultrasound"):
        img = load_image(path)
    assert "NOT calibrated" in caplog.text
    assert img.meta["spacing_calibrated"] is False and img.meta["us_region"] is None and not img.meta["cropped"]
    np.testing.assert_array_equal(img.affine.numpy(), np.eye(4))
    assert img.meta["colour"] == "rgb"  # no region says; the pixels are coloured
    assert load_ultrasound(path, colour="luminance").shape[0] == 1


def test_colour3d_cine_from_pydicom_data() -> None:
    path = pydicom_data("color3d_jpeg_baseline.dcm")  # 120 frames 480 x 640, one region inside the image
    img = load_image(path)
    assert tuple(img.shape) == (1, 595 - 84 + 1, 414 - 31 + 1, 120) and img.meta["crop_box"] == [84, 31, 595, 414]
    sx, sy = region_spacing(path, 0)
    np.testing.assert_array_equal(np.diag(img.affine.numpy())[:2], [sx, sy])
    assert img.meta["frame_times_ms"][1] == pytest.approx(33.333)


def test_dual_view_uses_the_largest_region_ties_to_the_first() -> None:
    path = pydicom_data("gdcm-US-ALOKA-16.dcm")  # two equal tissue regions side by side + a grey bar
    img = load_image(path)
    meta = img.meta
    assert [r["index"] for r in meta["us_regions"]] == [0, 1] and meta["us_region"]["index"] == 0
    assert meta["us_region_choice"] == "largest of 2" and meta["crop_box"] == [32, 24, 335, 415]
    assert img.shape[0] == 1 and meta["colour"] == "luminance"  # 16-bit palette B-mode
    np.testing.assert_array_equal(np.diag(img.affine.numpy())[:2], region_spacing(path, 0))
    right = load_ultrasound(path, region=1)
    assert right.meta["crop_box"] == [336, 24, 639, 415] and right.meta["us_region_choice"] == "option"
    with pytest.raises(ConfigError, match="region 2 is not a usable region"):
        load_ultrasound(path, region=2)


def test_synthetic_cine_colour_rules_and_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 255, size=(4, 40, 50), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    path = write_us(tmp_path / "cine.dcm", rgb, regions=[region(5, 4, 44, 33, 0.015)])
    img = load_ultrasound(path)
    assert tuple(img.shape) == (1, 40, 30, 4) and img.meta["colour"] == "luminance"
    np.testing.assert_allclose(img[0].numpy(), grey[:, 4:34, 5:45].transpose(2, 1, 0), atol=1e-3)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:2], [0.15, 0.15])
    assert img.meta["frame_times_ms"] == [0.0, 40.0, 80.0, 120.0]
    flow = write_us(tmp_path / "flow.dcm", rgb, regions=[region(5, 4, 44, 33, RegionDataType=2)])
    assert load_ultrasound(flow).meta["colour"] == "rgb" and load_ultrasound(flow).meta["colour_flow"]
    plain = write_us(tmp_path / "plain.dcm", rgb)  # no region, grey pixels in RGB: luminance
    assert load_ultrasound(plain).meta["colour"] == "luminance"
    full = load_ultrasound(path, crop=False)
    assert tuple(full.shape) == (1, 50, 40, 4) and not full.meta["cropped"]
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(path, folder / "cine.dcm")
    np.testing.assert_array_equal(load_image(folder).numpy(), img.numpy())
    assert read_header(folder).shape == (40, 30, 4)
    with pytest.raises(ConfigError, match="unknown ultrasound option"):
        load_ultrasound(path, crops=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"PhysicalUnitsXDirection": 42}, r"PhysicalUnitsXDirection \(0018,6024\) 42"),
        ({"PhysicalUnitsYDirection": 99}, r"PhysicalUnitsYDirection \(0018,6026\) 99"),
        (
            {"RegionLocationMinX0": 60, "RegionLocationMaxX1": 90},
            r"entirely outside.*RegionLocationMinX0 \(0018,6018\)",
        ),
        ({"RegionLocationMinY0": 30, "RegionLocationMaxY1": 20}, r"inverted bounds"),
    ],
)
def test_bad_regions_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    frames = np.zeros((1, 40, 50), dtype=np.uint8)
    path = write_us(tmp_path / "bad.dcm", frames, regions=[region(5, 4, 44, 33, **change)])
    with pytest.raises(DataError, match=message):
        load_ultrasound(path)
    with pytest.raises(DataError, match=message):
        read_header(path)


def test_frames_of_unequal_size_and_unknown_colour_space_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, size=(3, 32, 48, 3), dtype=np.uint8)
    jpeg = [frames[0], frames[1][:, :40], frames[2]]  # frame 2 is 40 columns wide
    path = write_us(tmp_path / "unequal.dcm", frames, photometric="YBR_FULL_422", jpeg_frames=jpeg)
    with pytest.raises(DataError, match=r"frame 2 of 3 is 40 x 32 .*Columns \(0028,0011\)"):
        load_ultrasound(path)
    ok = write_us(tmp_path / "equal.dcm", frames, photometric="YBR_FULL_422", jpeg_frames=list(frames))
    assert load_ultrasound(ok, colour="rgb").shape == (3, 48, 32, 3)
    odd = write_us(tmp_path / "hsv.dcm", frames[:1], photometric="HSV")
    with pytest.raises(DataError, match=r"PhotometricInterpretation \(0028,0004\) is HSV"):
        load_ultrasound(odd)


def test_us_preset_scales_by_percentiles() -> None:
    image = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 10, 10)
    out = intensity("us")[0]({"image": image})["image"]
    low, high = np.percentile(image.numpy(), [1, 99])
    np.testing.assert_allclose(float(out.flatten()[50]), (50 - low) / (high - low), atol=1e-5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert get_adapter("ultrasound").preset == "us"
