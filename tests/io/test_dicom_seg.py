"""DICOM SEG writing/reading against an oblique multi-slice CT-like series (fixtures in tests/io/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.errors import DataError
from medseg.io import load_image
from medseg.io.dicom_seg import read_dicom_seg, save_dicom_seg, write_dicom_seg

LABELS = ("background", "liver", "tumour")


def _phantom(shape: tuple[int, int, int]) -> np.ndarray:
    """Two labels at known voxels (X, Y, Z), asymmetric in X/Y, with empty slices (0 and the last)."""
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    labels[((ii - 40) ** 2 + (jj - 70) ** 2 <= 15**2) & (kk >= 1) & (kk <= 3)] = 1
    labels[90:110, 10:30, 2:5] = 2
    labels[:, :, 0] = 0
    labels[:, :, -1] = 0
    return labels


@pytest.fixture
def series_and_image(dicom_folder):
    image = load_image(dicom_folder.folder)
    return dicom_folder, image


def _mask_on(image: MetaTensor, labels: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(labels), affine=image.affine.clone())


def test_round_trip_voxel_for_voxel(series_and_image, tmp_path: Path) -> None:
    folder, image = series_and_image
    assert tuple(image.shape[1:]) == (128, 128, 6)
    labels = _phantom(tuple(image.shape[1:]))
    seg = write_dicom_seg(
        _mask_on(image, labels), folder.folder, LABELS, algorithm_name="tiny-unet", algorithm_version="1.2"
    )
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == 6  # slices 1-3 of label 1, 2-4 of label 2; empty frames omitted
    path = save_dicom_seg(seg, tmp_path / "out" / "seg.dcm")
    assert [p.name for p in path.parent.iterdir()] == ["seg.dcm"]  # no temporary left behind
    reread = pydicom.dcmread(path)
    back = read_dicom_seg(reread, folder.folder)
    assert back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(read_dicom_seg(path, folder.folder), labels)  # from a file path too

    # Descriptions, algorithm identification, references.
    segments = reread.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["liver", "tumour"]
    assert [int(s.SegmentNumber) for s in segments] == [1, 2]
    for s in segments:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentAlgorithmName == "tiny-unet"
        alg = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("tiny-unet", "1.2")
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    assert reread.ReferencedSeriesSequence[0].SeriesInstanceUID == folder.big.uid
    assert len(reread.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6


def test_frames_land_on_their_source_instances(series_and_image) -> None:
    """Checked against pydicom's own pixels and headers, independent of medseg's transposes and sorting."""
    folder, image = series_and_image
    threshold = float(np.median(image.numpy()))
    labels = (image[0].numpy() > threshold).astype(np.uint8)
    seg = write_dicom_seg(
        _mask_on(image, labels), folder.folder, ("bg", "bright"), algorithm_name="t", algorithm_version="1"
    )
    sources = {}
    for path in folder.big.files:
        ds = pydicom.dcmread(path)
        sources[ds.SOPInstanceUID] = ds
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    assert int(seg.NumberOfFrames) == len(sources)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[sop]
        hu = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)  # (rows, columns)
        np.testing.assert_array_equal(frame, (hu > threshold).astype(np.uint8))
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    first = next(iter(sources.values()))
    np.testing.assert_allclose([float(v) for v in iop], [float(v) for v in first.ImageOrientationPatient], atol=1e-5)


def test_segment_codes_and_series_choice(series_and_image) -> None:
    folder, _ = series_and_image
    small = load_image(folder.folder, series_uid=folder.small.uid)
    labels = np.zeros(tuple(small.shape[1:]), np.uint8)
    labels[5:20, 30:60, 1] = 2
    seg = write_dicom_seg(
        _mask_on(small, labels),
        folder.folder,
        LABELS,
        algorithm_name="m",
        algorithm_version="2",
        series_uid="1.2.826.0.1.3680043.8.498.1",
        segment_codes={"tumour": ("108369006", "SCT", "Neoplasm")},
        series_uid_filter=folder.small.uid,
    )
    assert seg.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == folder.small.uid
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert types == ["85756007", "108369006"]
    np.testing.assert_array_equal(read_dicom_seg(seg, folder.folder), labels)


def test_empty_mask_reads_back_empty(series_and_image) -> None:
    folder, image = series_and_image
    labels = np.zeros(tuple(image.shape[1:]), np.uint8)
    seg = write_dicom_seg(_mask_on(image, labels), folder.folder, LABELS, algorithm_name="m", algorithm_version="1")
    back = read_dicom_seg(seg, folder.folder)
    assert back.shape == labels.shape and not back.any()


def test_refusals(series_and_image) -> None:
    folder, image = series_and_image
    shape = tuple(image.shape[1:])
    kwargs = {"algorithm_name": "m", "algorithm_version": "1"}
    with pytest.raises(DataError, match="does not fit series"):
        write_dicom_seg(np.zeros((shape[1], shape[0], shape[2]), np.uint8)[:-1], folder.folder, LABELS, **kwargs)
    with pytest.raises(DataError, match="does not fit series"):
        write_dicom_seg(np.zeros((*shape[:2], shape[2] + 1), np.uint8), folder.folder, LABELS, **kwargs)
    too_high = np.zeros(shape, np.uint8)
    too_high[0, 0, 0] = 3
    with pytest.raises(DataError, match="label 3"):
        write_dicom_seg(too_high, folder.folder, LABELS, **kwargs)
    shifted = image.affine.clone()
    shifted[0, 3] += 2.0
    with pytest.raises(DataError, match="affine differs"):
        write_dicom_seg(
            MetaTensor(torch.zeros(shape, dtype=torch.uint8), affine=shifted), folder.folder, LABELS, **kwargs
        )
    with pytest.raises(DataError, match="unknown labels"):
        write_dicom_seg(
            np.zeros(shape, np.uint8), folder.folder, LABELS, segment_codes={"lung": ("1", "SCT", "x")}, **kwargs
        )
    with pytest.raises(DataError, match="not found"):
        write_dicom_seg(np.zeros(shape, np.uint8), folder.folder, LABELS, series_uid_filter="1.2.3", **kwargs)
    with pytest.raises(DataError, match="Segmentation Storage"):
        read_dicom_seg(pydicom.dcmread(folder.big.files[0]), folder.folder)
