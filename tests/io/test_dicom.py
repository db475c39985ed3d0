"""DICOM series: choice, sorting, affine, ITK-decoded values against pydicom, and refused geometry."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from medseg.core.errors import DataError
from medseg.io import list_dicom_series, load_image, save_mask


def test_largest_series_is_chosen(dicom_folder, volume_of, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="medseg.io.dicom"):
        img = load_image(dicom_folder.folder)
    big = dicom_folder.big
    assert img.shape == (1, 128, 128, 6) and img.dtype == torch.float32
    assert img.meta["series_uid"] == big.uid
    assert img.meta["source_format"] == "dicom" and img.meta["modality"] == "CT"
    assert img.meta["study_uid"] and img.meta["space"] == "RAS"
    np.testing.assert_allclose(img.affine.numpy(), big.affine_ras, atol=1e-4)
    # ITK's values (rescaled per slice) equal pydicom's, slice by slice in position order: nothing reordered.
    np.testing.assert_array_equal(img[0].numpy(), volume_of(big))
    assert dicom_folder.small.uid in caplog.text and big.uid in caplog.text


def test_series_listing_ignores_non_images(dicom_folder) -> None:
    series = list_dicom_series(dicom_folder.folder)
    assert [(s.uid, s.n_instances) for s in series] == [(dicom_folder.big.uid, 6), (dicom_folder.small.uid, 2)]
    assert series[1].description == "scout" and series[1].series_number == 2


def test_explicit_series_uid(dicom_folder, volume_of) -> None:
    small = dicom_folder.small
    img = load_image(dicom_folder.folder, series_uid=small.uid)
    assert img.shape == (1, 128, 128, 2) and img.meta["series_uid"] == small.uid
    np.testing.assert_allclose(img.affine.numpy(), small.affine_ras, atol=1e-4)
    np.testing.assert_array_equal(img[0].numpy(), volume_of(small))


def test_unknown_series_uid_lists_available(dicom_folder) -> None:
    with pytest.raises(DataError, match="1.2.3.4") as info:
        load_image(dicom_folder.folder, series_uid="1.2.3.4")
    message = str(info.value)
    assert dicom_folder.big.uid in message and dicom_folder.small.uid in message
    assert "scout" in message and "6 instances" in message


def test_affine_maps_voxels_to_patient_positions(dicom_folder) -> None:
    img = load_image(dicom_folder.folder)
    affine = img.affine.numpy()
    for k, path in enumerate(dicom_folder.big.files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ras = np.asarray(ds.ImagePositionPatient, float) * [-1, -1, 1]
        np.testing.assert_allclose((affine @ [0, 0, k, 1])[:3], ras, atol=1e-3)
        # one step along X (column index) moves along the row cosine by the column spacing
        step = (affine @ [1, 0, k, 1])[:3] - (affine @ [0, 0, k, 1])[:3]
        row_cos = np.asarray(ds.ImageOrientationPatient[:3], float) * [-1, -1, 1]
        np.testing.assert_allclose(step, row_cos * float(ds.PixelSpacing[1]), atol=1e-5)


def test_mask_saved_for_dicom_lands_on_the_grid(dicom_folder, tmp_path: Path) -> None:
    img = load_image(dicom_folder.folder)
    mask = (img[0].numpy() > 0).astype(np.uint8)
    back = load_image(save_mask(mask, img, tmp_path / "mask.nrrd"))
    np.testing.assert_array_equal(back[0].numpy(), mask)
    np.testing.assert_allclose(back.affine.numpy(), img.affine.numpy(), atol=1e-9)


def _only(series_writer, tmp_path: Path, **kwargs) -> Path:
    folder = tmp_path / "series"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when writing invalid DS values on purpose
        series_writer(folder, n=kwargs.pop("n", 4), vary_rescale=False, **kwargs)
    return folder


def test_nan_pixel_spacing_is_refused(series_writer, tmp_path: Path) -> None:
    folder = _only(series_writer, tmp_path, pixel_spacing=("nan", "nan"))
    with pytest.raises(DataError, match="PixelSpacing") as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_image(folder)
    assert str(folder) in str(info.value)


def test_non_positive_pixel_spacing_is_refused(series_writer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="PixelSpacing"):
        load_image(_only(series_writer, tmp_path, pixel_spacing=(0.0, 0.5)))


def test_uneven_gap_is_refused(series_writer, tmp_path: Path) -> None:
    positions = [(0.0, 0.0, z) for z in (0.0, 2.0, 4.0, 7.0)]
    with pytest.raises(DataError, match=r"inconsistent slice gaps \(min 2\.0000 mm, max 3\.0000 mm"):
        load_image(_only(series_writer, tmp_path, positions=positions))


def test_duplicate_positions_are_refused(series_writer, tmp_path: Path) -> None:
    positions = [(0.0, 0.0, z) for z in (0.0, 2.0, 2.0, 4.0)]
    with pytest.raises(DataError, match="duplicate slice positions"):
        load_image(_only(series_writer, tmp_path, positions=positions))


def test_mixed_orientation_and_size_are_refused(series_writer, tmp_path: Path) -> None:
    folder = _only(series_writer, tmp_path)
    path = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(path)
    with pytest.raises(DataError, match="ImageOrientationPatient differs"):
        load_image(folder)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = 64, 256
    ds.save_as(path)
    with pytest.raises(DataError, match="Rows/Columns"):
        load_image(folder)


def test_gantry_tilt_is_refused(series_writer, tmp_path: Path) -> None:
    positions = [(1.5 * k, 0.0, 2.0 * k) for k in range(4)]  # even gaps along the normal, but sheared
    with pytest.raises(DataError, match="within the slice plane"):
        load_image(_only(series_writer, tmp_path, positions=positions))


def test_ties_go_to_the_lowest_series_number(series_writer, tmp_path: Path) -> None:
    series_writer(tmp_path / "a", n=3, series_number=5, seed=5)
    wanted = series_writer(tmp_path / "b", n=3, series_number=3, seed=6)
    assert load_image(tmp_path).meta["series_uid"] == wanted.uid


def test_multiframe_is_refused(series_writer, tmp_path: Path) -> None:
    folder = _only(series_writer, tmp_path, n=2)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 2
        ds.save_as(path)
    with pytest.raises(DataError, match="multi-frame"):
        load_image(folder)


def test_single_slice_uses_slice_thickness(series_writer, tmp_path: Path) -> None:
    img = load_image(_only(series_writer, tmp_path, n=1, gap=4.0))
    assert img.shape == (1, 128, 128, 1)
    np.testing.assert_allclose(img.affine.numpy()[:3, 2], [0.0, 0.0, 4.0], atol=1e-6)


def test_folder_without_images_is_refused(dicom_folder, tmp_path: Path) -> None:
    empty = tmp_path / "no_images"
    empty.mkdir()
    shutil.copy(dicom_folder.folder / "report.dcm", empty)
    (empty / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no DICOM image series"):
        load_image(empty)
