"""DICOM SEG on X-ray angiography runs and ultrasound cines: frame references instead of plane positions."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.errors import DataError
from medseg.io import load_image
from medseg.io.dicom_seg import read_dicom_seg, read_frame_seg, save_dicom_seg, write_dicom_seg, write_frame_seg
from tests.io.modality_files import region, write_us, write_xa, xa_frames

ROWS, COLS = 40, 56
OPACITY = [0.0, 0.0, 0.0, 0.5, 1.0, 0.8, 0.3]  # 7 frames; AVG_SUB of frames 1-3 applies to frames 4-7
LABELS = ("background", "vessel", "catheter")


@pytest.fixture
def xa_run(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    return write_xa(
        tmp_path / "run" / "xa.dcm",
        xa_frames(ROWS, COLS, OPACITY),
        mask_items=[{"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [1, 2, 3], "ApplicableFrameRange": [4, 7]}],
        extra={"PatientName": "Phantom^XA", "StudyDate": "20240102"},
    )


@pytest.fixture
def us_cine(tmp_path: Path) -> Path:
    frames = np.random.default_rng(0).integers(0, 255, (5, 48, 64), dtype=np.uint8)
    (tmp_path / "cine").mkdir()
    return write_us(tmp_path / "cine" / "us.dcm", frames, regions=[region(8, 4, 55, 43)])


def _mask_like(image: MetaTensor, labels: np.ndarray) -> MetaTensor:
    """What ``Prediction.mask`` is: the labels on the loaded grid with the image's affine and meta."""
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    return MetaTensor(torch.as_tensor(labels), affine=image.affine.clone(), meta=meta)


def _labels(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for t in range(1, shape[2]):  # frame 0 stays empty (its SEG frames are omitted)
        x, y = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 6)
        labels[x : x + 8, y : y + 6, t] = 1
        labels[x + 2 : x + 4, y + 1 : y + 3, t] = 2 if t % 2 else 1
    return labels


def _frame_numbers(seg: pydicom.Dataset) -> list[tuple[int, list[int]]]:
    out = []
    for group in seg.PerFrameFunctionalGroupsSequence:
        element = group.DerivationImageSequence[0].SourceImageSequence[0]["ReferencedFrameNumber"]
        frames = [int(v) for v in element.value] if element.VM > 1 else [int(element.value)]
        out.append((int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber), frames))
    return out


def test_xa_run_round_trip_references_each_source_frame(xa_run: Path, tmp_path: Path) -> None:
    image = load_image(xa_run)
    assert tuple(image.shape) == (1, COLS, ROWS, 7)
    labels = _labels(tuple(image.shape[1:]))
    seg = write_dicom_seg(
        _mask_like(image, labels), xa_run.parent, LABELS, algorithm_name="unet2d", algorithm_version="3"
    )
    source = pydicom.dcmread(xa_run, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in seg and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (ROWS, COLS)
    assert str(seg.StudyInstanceUID) == str(source.StudyInstanceUID) and str(seg.PatientName) == "Phantom^XA"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    expected_frames = [(s, t + 1) for s in (1, 2) for t in range(7) if (labels[..., t] == s).any()]
    assert int(seg.NumberOfFrames) == len(expected_frames)  # empty (segment, frame) pairs omitted
    got = [(s, frames[0]) for s, frames in _frame_numbers(seg)]
    assert got == expected_frames
    for group in seg.PerFrameFunctionalGroupsSequence:
        assert "PlanePositionSequence" not in group
        item = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        content = group.FrameContentSequence[0]
        assert list(content.DimensionIndexValues)[1] == content.TemporalPositionIndex == int(item.ReferencedFrameNumber)
    written = io.BytesIO()
    pydicom.dcmwrite(written, seg)  # as STOW-RS clients write it: a Part 10 file with preamble and file meta
    assert written.getvalue()[128:132] == b"DICM"
    path = save_dicom_seg(seg, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg(path, xa_run.parent), labels)
    np.testing.assert_array_equal(read_frame_seg(pydicom.dcmread(path), xa_run), labels)
    # highdicom reads the frame references too
    reread = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    pixels = reread.get_pixels_by_source_frame(
        str(source.SOPInstanceUID),
        source_frame_numbers=list(range(1, 8)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(np.transpose(pixels, (2, 1, 0)), labels)


def test_minip_mask_references_the_frames_it_was_projected_over(xa_run: Path) -> None:
    minip = load_image(xa_run, modality_options={"derive": "minip"})
    assert minip.meta["subtracted_frames"] == [4, 5, 6, 7]
    labels = np.zeros(tuple(minip.shape[1:]), dtype=np.uint8)
    labels[10:30, 5:9, 0] = 1
    seg = write_dicom_seg(_mask_like(minip, labels), xa_run, LABELS[:2], algorithm_name="u", algorithm_version="1")
    assert int(seg.NumberOfFrames) == 1
    assert _frame_numbers(seg) == [(1, [4, 5, 6, 7])]
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert [c.CodeValue for c in derivation.DerivationCodeSequence] == ["113079", "113076"]
    assert "minimum-intensity projection of frames 4-7" in derivation.DerivationDescription
    assert len(seg.DimensionIndexSequence) == 1  # segment number only: one SEG frame per segment
    back = read_dicom_seg(seg, xa_run)
    assert back.shape == (COLS, ROWS, 7)
    for frame in range(7):
        np.testing.assert_array_equal(back[..., frame], labels[..., 0] if frame >= 3 else 0)

    peak = load_image(xa_run, modality_options={"derive": "peak"})
    seg = write_dicom_seg(_mask_like(peak, labels), xa_run, LABELS[:2], algorithm_name="u", algorithm_version="1")
    assert _frame_numbers(seg) == [(1, [peak.meta["peak_frame_number"]])] and peak.meta["peak_frame_number"] == 5
    np.testing.assert_array_equal(read_dicom_seg(seg, xa_run)[..., 4], labels[..., 0])


def test_us_cine_mask_on_the_crop_is_pasted_onto_the_full_frames(us_cine: Path) -> None:
    image = load_image(us_cine)
    assert tuple(image.shape) == (1, 48, 40, 5) and image.meta["crop_box"] == [8, 4, 55, 43]
    labels = _labels(tuple(image.shape[1:]), seed=4)
    seg = write_dicom_seg(_mask_like(image, labels), us_cine.parent, LABELS, algorithm_name="u", algorithm_version="1")
    assert (seg.Rows, seg.Columns) == (48, 64)
    full = np.zeros((64, 48, 5), dtype=np.uint8)
    full[8:56, 4:44] = labels
    np.testing.assert_array_equal(read_dicom_seg(seg, us_cine.parent), full)
    # a mask already on the source frames is taken as it is
    again = write_frame_seg(full, us_cine, LABELS, algorithm_name="u", algorithm_version="1")
    np.testing.assert_array_equal(read_frame_seg(again, us_cine), full)


def test_single_frame_us_has_no_frame_numbers(tmp_path: Path) -> None:
    frame = np.random.default_rng(2).integers(0, 255, (1, 30, 36), dtype=np.uint8)
    path = write_us(tmp_path / "one.dcm", frame, regions=[region(0, 0, 35, 29)])
    image = load_image(path)
    labels = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
    labels[3:9, 4:20, 0] = 1
    seg = write_dicom_seg(_mask_like(image, labels), path, LABELS[:2], algorithm_name="u", algorithm_version="1")
    item = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert "ReferencedFrameNumber" not in item  # a single-frame instance: the reference covers the image
    np.testing.assert_array_equal(read_dicom_seg(seg, path), labels)


def test_empty_mask_still_writes_one_frame(us_cine: Path) -> None:
    image = load_image(us_cine)
    seg = write_dicom_seg(
        _mask_like(image, np.zeros(tuple(image.shape[1:]), np.uint8)),
        us_cine,
        LABELS,
        algorithm_name="u",
        algorithm_version="1",
    )
    assert int(seg.NumberOfFrames) == 1
    assert not read_dicom_seg(seg, us_cine).any()


def test_masks_that_do_not_fit_the_source_are_refused(xa_run: Path, us_cine: Path) -> None:
    image = load_image(xa_run)
    labels = _labels(tuple(image.shape[1:]))
    with pytest.raises(DataError, match="6 frame.*source holds 7"):
        write_frame_seg(labels[..., :6], xa_run, LABELS, algorithm_name="u", algorithm_version="1")
    with pytest.raises(DataError, match="derived image"):  # one frame, no meta saying how it was derived
        write_frame_seg(labels[..., :1], xa_run, LABELS, algorithm_name="u", algorithm_version="1")
    with pytest.raises(DataError, match="Columns x Rows"):
        write_frame_seg(labels[1:], xa_run, LABELS, algorithm_name="u", algorithm_version="1")
    with pytest.raises(DataError, match="does not fit the loaded image"):  # cropped grid, but not the crop's size
        us = load_image(us_cine)
        write_dicom_seg(
            _mask_like(us, np.zeros((47, 40, 5), np.uint8)), us_cine, LABELS, algorithm_name="u", algorithm_version="1"
        )
    with pytest.raises(DataError, match="label 2 but only 2"):
        write_frame_seg(labels, xa_run, LABELS[:2], algorithm_name="u", algorithm_version="1")
    with pytest.raises(DataError, match="0 X-ray angiography / ultrasound"):
        write_frame_seg(
            labels,
            xa_run.parent.parent / "cine",
            LABELS,
            algorithm_name="u",
            algorithm_version="1",
            meta={"sop_instance_uid": "1.2.3"},
        )


def test_reading_against_the_wrong_source_is_refused(xa_run: Path, us_cine: Path) -> None:
    image = load_image(xa_run)
    seg = write_dicom_seg(
        _mask_like(image, _labels(tuple(image.shape[1:]))), xa_run, LABELS, algorithm_name="u", algorithm_version="1"
    )
    with pytest.raises(DataError, match="matching SOPInstanceUID"):
        read_dicom_seg(seg, us_cine)
