"""2D images: PNG/JPEG/TIFF and single DICOM files as (C, X, Y, 1) volumes, and PNG/TIFF masks written back."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import skimage.data
import tifffile
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medseg.core.errors import ConfigError, DataError
from medseg.io import load_image, read_raster, same_geometry, save_image, save_mask, write_raster
from medseg.io.dicom import sorted_series_files

SKIMAGE_DATA = Path(skimage.data.__file__).parent
RNG_SEED = 11


def as_xy(rows_cols: np.ndarray) -> np.ndarray:
    """A PIL-style ``(rows, cols[, c])`` array as the medseg ``(C, X, Y)`` layout."""
    arr = rows_cols if rows_cols.ndim == 3 else rows_cols[..., None]
    return np.transpose(arr, (2, 1, 0))


@pytest.mark.parametrize(("name", "channels"), [("ihc.png", 3), ("retina.jpg", 3), ("microaneurysms.png", 1)])
def test_skimage_files_keep_pixels_with_x_as_column(name: str, channels: int) -> None:
    path = SKIMAGE_DATA / name
    pil = np.asarray(Image.open(path))
    img = load_image(path)
    rows, cols = pil.shape[:2]
    assert tuple(img.shape) == (channels, cols, rows, 1) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[..., 0].numpy(), as_xy(pil).astype(np.float32))
    r, c = 17, 42
    np.testing.assert_array_equal(img[:, c, r, 0].numpy(), np.atleast_1d(pil[r, c]).astype(np.float32))
    # ihc.png declares 96 dpi (an editor default) and retina.jpg 150 dpi (JPEG densities are ignored): 1 mm pixels
    np.testing.assert_array_equal(img.affine.numpy(), np.eye(4))
    meta = img.meta
    assert meta["source_format"] == "raster" and meta["space"] == "RAS" and meta["pixel_size_source"] == "default"
    assert meta["filename_or_obj"] == str(path) and tuple(meta["spatial_shape"]) == (cols, rows, 1)
    np.testing.assert_array_equal(meta["original_affine"], np.eye(4))


def test_non_square_16bit_png_and_declared_resolution(tmp_path: Path) -> None:
    rows_cols = np.random.default_rng(RNG_SEED).integers(0, 65536, size=(10, 13)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(rows_cols).save(path, dpi=(254, 127))  # 0.1 mm x 0.2 mm pixels, stored in pixels per metre
    img = read_raster(path)
    assert tuple(img.shape) == (1, 13, 10, 1)
    np.testing.assert_array_equal(img[0, :, :, 0].numpy(), rows_cols.T.astype(np.float32))
    np.testing.assert_allclose(np.diag(img.affine.numpy()), [0.1, 0.2, 1.0, 1.0], atol=1e-6)
    assert img.meta["pixel_size_source"] == "file"


def test_16bit_colour_png_keeps_values_and_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(RNG_SEED).integers(0, 65536, size=(6, 9, 4)).astype(np.uint16)
    path = tmp_path / "rgba16.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(path))
    img = read_raster(path)
    np.testing.assert_array_equal(img[..., 0].numpy(), as_xy(rgba[..., :3]).astype(np.float32))


def test_8bit_alpha_palette_and_bilevel_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(RNG_SEED)
    rgba = rng.integers(0, 256, size=(5, 7, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "rgba.png")[..., 0].numpy(), as_xy(rgba[..., :3]))
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "la.png")[..., 0].numpy(), as_xy(rgba[..., 0]))
    index = rng.integers(0, 3, size=(5, 7)).astype(np.uint8)
    grey = Image.fromarray(index, "P")
    grey.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255])
    grey.save(tmp_path / "grey_palette.png")
    img = read_raster(tmp_path / "grey_palette.png")
    np.testing.assert_array_equal(img[0, :, :, 0].numpy(), (np.array([0, 128, 255])[index]).T)
    colour = Image.fromarray(index, "P")
    colour.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    colour.save(tmp_path / "colour_palette.png")
    img = read_raster(tmp_path / "colour_palette.png")
    assert img.shape[0] == 3 and float(img[1].max()) == 255.0 and float(img[2].max()) == 0.0
    Image.fromarray(index > 0).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "bilevel.png")[0, :, :, 0].numpy(), (index > 0).T)


def test_tiff_16bit_rgb_float_and_resolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(RNG_SEED)
    rgb16 = rng.integers(0, 65536, size=(8, 11, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb", resolution=(2000.0, 4000.0), resolutionunit=3)
    img = load_image(tmp_path / "rgb16.tif")
    np.testing.assert_array_equal(img[..., 0].numpy(), as_xy(rgb16).astype(np.float32))
    np.testing.assert_allclose(np.diag(img.affine.numpy()), [0.005, 0.0025, 1.0, 1.0], rtol=1e-9)  # 2000 px/cm
    values = rng.normal(size=(8, 11)).astype(np.float32)
    tifffile.imwrite(tmp_path / "float.tiff", values)
    np.testing.assert_array_equal(load_image(tmp_path / "float.tiff")[0, :, :, 0].numpy(), values.T)
    rgba = rng.integers(0, 256, size=(8, 11, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.tif")[..., 0].numpy(), as_xy(rgba[..., :3]))


@pytest.mark.parametrize("name", ["multipage.tif", "multipage_rgb.tif"])
def test_multipage_tiff_is_refused(name: str) -> None:
    with pytest.raises(DataError, match=r"holds 2 pages.*expected a single 2D image.*hint:"):
        load_image(SKIMAGE_DATA / name)


def test_stack_written_as_pages_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 6, 5), np.uint8), photometric="minisblack", metadata=None)
    with pytest.raises(DataError, match="single 2D image"):
        read_raster(tmp_path / "stack.tif")


@pytest.mark.parametrize(("name", "fmt"), [("broken.png", "PNG"), ("broken.jpg", "JPEG"), ("broken.tif", "TIFF")])
def test_corrupt_files_raise_data_error(tmp_path: Path, name: str, fmt: str) -> None:
    source = SKIMAGE_DATA / "microaneurysms.png"
    data = source.read_bytes()[:200] if fmt == "PNG" else b"not an image at all" * 10
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=f"cannot read {name} as {fmt}.*re-export it"):
        load_image(tmp_path / name)


def test_series_uid_is_refused_for_2d_files() -> None:
    with pytest.raises(ConfigError, match="series_uid"):
        load_image(SKIMAGE_DATA / "microaneurysms.png", series_uid="1.2.3")


# --------------------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_dicom_file_rescale_and_affine(tmp_path: Path, name: str) -> None:
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    img = load_image(path)
    assert tuple(img.shape) == (1, ds.Columns, ds.Rows, 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = ds.pixel_array.astype(np.float64) * slope + intercept
    np.testing.assert_array_equal(img[0, :, :, 0].numpy(), expected.T.astype(np.float32))
    affine = img.affine.numpy()
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(affine[:3, 3], np.asarray(ds.ImagePositionPatient, float) * flip, atol=1e-6)
    row_cos = np.asarray(ds.ImageOrientationPatient[:3], float) * flip
    col_cos = np.asarray(ds.ImageOrientationPatient[3:], float) * flip
    np.testing.assert_allclose(affine[:3, 0], row_cos * float(ds.PixelSpacing[1]), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], col_cos * float(ds.PixelSpacing[0]), atol=1e-6)
    # the same affine as the series reader gives the file as a one-slice series
    shutil.copy(path, tmp_path / name)
    _, _, series_affine = sorted_series_files(tmp_path)
    np.testing.assert_allclose(affine, series_affine, atol=1e-9)
    assert img.meta["source_format"] == "dicom" and img.meta["modality"] == ds.Modality
    assert img.meta["geometry_source"] == "patient" and img.meta["series_uid"] == ds.SeriesInstanceUID


def test_dicom_colour_without_patient_geometry() -> None:
    rgb = load_image(get_testdata_file("examples_rgb_color.dcm"))  # US, RGB, no spacing at all
    ds = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))
    np.testing.assert_array_equal(rgb[..., 0].numpy(), as_xy(ds.pixel_array).astype(np.float32))
    np.testing.assert_array_equal(rgb.affine.numpy(), np.eye(4))
    palette = load_image(get_testdata_file("examples_palette.dcm"))  # US, PALETTE COLOR, calibrated regions (cm)
    assert palette.shape[0] == 3 and palette.meta["geometry_source"] == "SequenceOfUltrasoundRegions"
    np.testing.assert_allclose(np.diag(palette.affine.numpy())[:2], [0.2622878766196998] * 2, rtol=1e-9)


def test_multi_frame_and_non_image_dicom_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"multi-frame images \(NumberOfFrames > 1\) are not supported"):
        load_image(get_testdata_file("emri_small.dcm"))
    with pytest.raises(DataError, match="SEG object, not an image"):
        load_image(get_testdata_file("liver_1frame.dcm"))
    with pytest.raises(DataError, match=r"MR_truncated.dcm: PixelData claims 8192 bytes but the file holds 8130"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="cannot read x.dcm as DICOM"):
        load_image(tmp_path / "x.dcm")


# --------------------------------------------------------------------------------------------------- writing


def _labels(shape: tuple[int, int], top: int) -> np.ndarray:
    labels = np.zeros(shape, np.int64)
    labels[2:6, 1:4] = 1
    labels[3:5, 2:3] = top
    return labels


@pytest.mark.parametrize(("suffix", "top", "dtype"), [(".png", 2, np.uint8), (".tif", 300, np.uint16)])
def test_save_mask_png_tiff_round_trip(tmp_path: Path, suffix: str, top: int, dtype: type) -> None:
    image_path = tmp_path / "image.png"
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(image_path, dpi=(254, 254))  # 7 columns, 9 rows, 0.1 mm
    ref = load_image(image_path)
    labels = _labels((7, 9), top)
    out = save_mask(labels[..., None], ref, tmp_path / f"mask{suffix}")
    stored = np.asarray(Image.open(out))
    assert stored.dtype == dtype and stored.shape == (9, 7)  # rows = Y, columns = X
    back = read_raster(out)
    np.testing.assert_array_equal(back[0].numpy(), labels[..., None])
    assert same_geometry(back, ref, atol=1e-4)
    np.testing.assert_array_equal(
        load_image(save_mask(torch.as_tensor(labels), ref, tmp_path / "m2.png"))[0, ..., 0], labels
    )


def test_save_mask_nifti_of_a_2d_image_and_refusals(tmp_path: Path) -> None:
    ref = load_image(SKIMAGE_DATA / "microaneurysms.png")
    labels = _labels((102, 102), 2)
    back = nib.load(str(save_mask(labels, ref, tmp_path / "mask.nii.gz")))
    assert back.shape == (102, 102, 1) and np.array_equal(np.asarray(back.dataobj)[..., 0], labels)
    with pytest.raises(DataError, match="PNG/TIFF hold one 2D slice; write NIfTI for volumes"):
        save_mask(np.zeros((4, 4, 2), np.uint8), load_image(save_mask_ref(tmp_path)), tmp_path / "two.png")
    with pytest.raises(DataError, match="labels 0..65535"):
        write_raster(np.full((4, 4), 70000), tmp_path / "big.png")
    with pytest.raises(DataError, match="save_image writes volumes"):
        save_image(ref, tmp_path / "image.png")
    with pytest.raises(DataError, match="as a 2D mask"):
        write_raster(labels, tmp_path / "mask.jpg")
    assert not list(tmp_path.glob(".*tmp*"))


def save_mask_ref(tmp_path: Path) -> Path:
    """A 4 x 4 x 2 NIfTI volume (a reference with two slices)."""
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(path))
    return path
