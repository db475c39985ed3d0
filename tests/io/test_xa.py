"""X-ray angiography: mask subtraction by the Mask Subtraction Sequence, automatic mask + registration, spacing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io import VoxelLimitError, get_adapter, load_image, load_xa, read_header
from medseg.io.xa import auto_mask_frames, register_shift, shift_image, xa_spacing
from tests.io.modality_files import ENHANCED_XA, anatomy, functional_groups, write_xa, xa_frames

ROWS, COLS = 64, 80
OPACITY = [0.0, 0.0, 0.0, 0.0, 0.3, 0.7, 1.0, 0.8, 0.5, 0.2]  # contrast arrives at frame 5 (1-based), peaks at 7
TOL = 1e-3  # log-domain error of rounding the stored intensities to integers


def expected(opacity: list[float], shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The ideal subtracted series ``(X, Y, T)``: ``-opacity[t] * mu_vessel`` (vessels negative)."""
    _, vessel = anatomy(ROWS, COLS, shift)
    return -np.asarray(opacity)[None, None, :] * vessel.T[:, :, None]


@pytest.fixture
def avg_sub(tmp_path: Path) -> Path:
    return write_xa(
        tmp_path / "avg.dcm",
        xa_frames(ROWS, COLS, OPACITY),
        mask_items=[{"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [1, 2, 3], "ApplicableFrameRange": [4, 10]}],
        extra={
            "ImagerPixelSpacing": [0.3, 0.2],
            "EstimatedRadiographicMagnificationFactor": 1.25,
            "FrameIncrementPointer": 0x00181065,
            "FrameTimeVector": [0, 40, 40, 40, 80, 40, 40, 40, 40, 40],
            "FrameTime": 66.7,  # not the one the pointer names
            "PositionerPrimaryAngle": -30.5,
            "PositionerSecondaryAngle": 12.0,
        },
    )


def test_avg_sub_follows_the_mask_subtraction_sequence(avg_sub: Path) -> None:
    img = load_xa(avg_sub)
    assert tuple(img.shape) == (1, COLS, ROWS, 10)  # (C, X = column, Y = row, T)
    data = img[0].numpy()
    np.testing.assert_allclose(data[..., 3:], expected(OPACITY)[..., 3:], atol=TOL)
    assert np.all(data[..., :3] == 0)  # frames 1-3 lie outside the Applicable Frame Range
    assert data.min() < -0.3  # vessels are dark: log(live) - log(mask) < 0
    meta = img.meta
    assert meta["mask_source"] == "tags" and meta["mask_operations"] == ["AVG_SUB"]
    assert meta["mask_frames"] == [1, 2, 3] and meta["subtracted_frames"] == list(range(4, 11))
    assert meta["subtraction_domain"] == "log" and meta["registration"] == "tags"
    assert meta["frame_time_source"] == "FrameTimeVector"
    assert meta["frame_times_ms"] == [0, 40, 80, 120, 200, 240, 280, 320, 360, 400]
    assert meta["positioner_primary_angle"] == -30.5 and meta["positioner_secondary_angle"] == 12.0
    assert meta["number_of_frames"] == 10 and meta["sop_instance_uid"] and meta["peak_frame_number"] == 7
    # Imager Pixel Spacing (row 0.3, column 0.2) / magnification 1.25, at the isocentre
    np.testing.assert_array_equal(np.diag(img.affine.numpy()), [0.2 / 1.25, 0.3 / 1.25, 1.0, 1.0])
    assert meta["spacing_plane"] == "isocentre" and meta["spacing_calibrated"] and meta["magnification"] == 1.25


def test_derived_minip_and_peak(avg_sub: Path) -> None:
    minip = load_xa(avg_sub, derive="minip")
    assert tuple(minip.shape) == (1, COLS, ROWS, 1)
    np.testing.assert_allclose(minip[0, ..., 0].numpy(), expected(OPACITY)[..., 6], atol=TOL)  # peak opacity 1.0
    peak = load_xa(avg_sub, derive="peak")
    assert peak.meta["frames_in_output"] == [7]
    np.testing.assert_array_equal(peak[0, ..., 0].numpy(), load_xa(avg_sub)[0, ..., 6].numpy())
    native = load_xa(avg_sub, subtract=False)
    assert native.meta["subtracted"] is False and float(native.max()) > 1000  # stored intensities


def test_load_image_read_header_and_folder_dispatch_to_the_adapter(avg_sub: Path, tmp_path: Path) -> None:
    direct = load_xa(avg_sub)
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(avg_sub, folder / "run.dcm")
    for source in (avg_sub, folder):  # a file, and a folder whose series is this one multi-frame file
        img = load_image(source)
        assert img.meta["modality_adapter"] == "xa"
        np.testing.assert_array_equal(img.numpy(), direct.numpy())
        header = read_header(source)
        assert header.shape == (COLS, ROWS, 10) and header.channels == 1
        assert header.spacing == pytest.approx((0.16, 0.24, 1.0))
    assert load_image(avg_sub, modality_options={"derive": "minip"}).shape[-1] == 1
    with pytest.raises(VoxelLimitError):  # refused from the header, before decoding
        load_image(avg_sub, max_voxels=COLS * ROWS * 10 - 1)
    with pytest.raises(ConfigError, match="no modality adapter reads"):
        load_image(get_testdata_file("CT_small.dcm"), modality_options={"derive": "minip"})
    with pytest.raises(ConfigError, match="unknown XA option"):
        load_image(avg_sub, modality_options={"derivee": "minip"})


def test_restore_mask_checks_the_grid(avg_sub: Path) -> None:
    adapter = get_adapter("xa")
    img = load_xa(avg_sub, derive="minip")
    mask = (img[0].numpy() < -0.2).astype(np.uint8)
    np.testing.assert_array_equal(adapter.restore_mask(mask, img.meta), mask)
    with pytest.raises(ModelInputError, match="XA mask has shape"):
        adapter.restore_mask(mask[:-1], img.meta)
    assert adapter.preset == "zscore"


@pytest.mark.parametrize("fraction", [False, True])
def test_mask_sub_pixel_shift_sign(tmp_path: Path, fraction: bool) -> None:
    # the mask frames were taken with the patient 2 rows down and 3 columns right of the live frames
    moved = (2.25, 3.5) if fraction else (2.0, 3.0)
    frames = xa_frames(ROWS, COLS, OPACITY, [moved] * 4 + [(0.0, 0.0)] * 6)
    # DICOM: a positive row offset moves the mask down, a positive column offset moves it to the LEFT
    good = {"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [2, 3, 4], "ApplicableFrameRange": [5, 10]}
    good["MaskSubPixelShift"] = [-moved[0], moved[1]]
    img = load_xa(write_xa(tmp_path / "good.dcm", frames, mask_items=[good]), shift_order=3)
    assert img.meta["mask_shifts"][6] == pytest.approx([-moved[0], -moved[1]])
    inner = (slice(6, -6), slice(6, -6))
    residual = np.abs(img[0].numpy()[inner] - expected(OPACITY)[inner]).max()
    assert residual < (TOL if not fraction else 0.03)
    bad = dict(good, MaskSubPixelShift=[-moved[0], -moved[1]])
    wrong = load_xa(write_xa(tmp_path / "bad.dcm", frames, mask_items=[bad]), shift_order=3)
    assert np.abs(wrong[0].numpy()[inner] - expected(OPACITY)[inner]).max() > 10 * residual


def test_tid_and_rev_tid(tmp_path: Path) -> None:
    frames = xa_frames(ROWS, COLS, OPACITY)
    logs = np.log(np.maximum(frames.astype(np.float64), 1.0)).transpose(2, 1, 0)  # (X, Y, T)
    tid = load_xa(write_xa(tmp_path / "tid.dcm", frames, mask_items=[{"MaskOperation": "TID", "TIDOffset": 2}]))
    assert tid.meta["subtracted_frames"] == list(range(3, 11))  # default range: frames whose mask f - 2 exists
    assert tid.meta["mask_frames_per_frame"][6] == [5]
    np.testing.assert_allclose(tid[0, ..., 6].numpy(), logs[..., 6] - logs[..., 4], atol=1e-5)
    rev = {"MaskOperation": "REV_TID", "TIDOffset": 1, "ApplicableFrameRange": [5, 8]}
    img = load_xa(write_xa(tmp_path / "rev.dcm", frames, mask_items=[rev]))
    # MFN = (FCFN - offset) - (CFN - FCFN): frames 5, 6, 7, 8 use masks 4, 3, 2, 1
    assert [img.meta["mask_frames_per_frame"][f - 1] for f in (5, 6, 7, 8)] == [[4], [3], [2], [1]]
    np.testing.assert_allclose(img[0, ..., 7].numpy(), logs[..., 7] - logs[..., 0], atol=1e-5)


def test_automatic_mask_and_registration_recover_a_sub_pixel_shift(tmp_path: Path) -> None:
    shift = (0.35, -0.8)  # the patient moves after the pre-contrast frames
    opacity = [0.0] * 6 + [0.2, 0.6, 1.0, 0.9, 0.6, 0.3]
    frames = xa_frames(ROWS, COLS, opacity, [(0.0, 0.0)] * 6 + [shift] * 6)
    img = load_xa(write_xa(tmp_path / "auto.dcm", frames, mask_items=[{"MaskOperation": "NONE"}]), shift_order=3)
    assert img.meta["mask_source"] == "auto" and img.meta["registration"] == "phase_correlation"
    assert img.meta["mask_frames"] == [2, 3, 4, 5]  # the 4 before arrival (frame 7), leaving out frame 6
    for f in range(6, 12):
        np.testing.assert_allclose(img.meta["mask_shifts"][f], shift, atol=0.1)  # sign: the mask moves like the patient
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(img[0].numpy()[inner][..., 6:] - expected(opacity, shift)[inner][..., 6:]).max() < 0.05
    assert img.meta["peak_frame_number"] == 9
    off = load_xa(tmp_path / "auto.dcm", registration="off")
    assert off.meta["mask_shifts"][8] == [0.0, 0.0]
    given = load_xa(tmp_path / "auto.dcm", mask_frames=[2, 3])
    assert given.meta["mask_source"] == "option" and given.meta["mask_frames"] == [2, 3]


def test_register_shift_and_shift_image_agree() -> None:
    mu, _ = anatomy(ROWS, COLS)
    moved, _ = anatomy(ROWS, COLS, (1.3, -0.45))
    found = register_shift(moved, mu)
    np.testing.assert_allclose(found, (1.3, -0.45), atol=0.1)
    from scipy import ndimage

    image = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    np.testing.assert_allclose(
        shift_image(image, (0.4, -1.3)), ndimage.shift(image, (0.4, -1.3), order=1, mode="nearest"), atol=1e-5
    )


def test_auto_mask_rule() -> None:
    assert auto_mask_frames([10, 10, 10, 10, 10, 9, 8, 8.5]) == [0, 1, 2, 3]  # arrival at index 5
    assert auto_mask_frames([10, 10, 10, 10]) == [0]  # no contrast: the first frame
    assert auto_mask_frames([10, 9, 8]) == [0]
    assert auto_mask_frames([10] * 10 + [5], max_frames=3) == [6, 7, 8]


def test_enhanced_xa_per_frame_shift_spacing_and_times(tmp_path: Path) -> None:
    moves = [(0.0, 0.0)] * 4 + [(0.0, float(k)) for k in range(1, 7)]  # the patient drifts right, frame by frame
    frames = xa_frames(ROWS, COLS, OPACITY, moves)
    per_frame = []
    for f in range(10):
        stamp = f"20240101120000.{f * 50000:06d}"  # 50 ms apart
        group: dict = {"FrameContentSequence": {"FrameReferenceDateTime": stamp}}
        group["PositionerPositionSequence"] = {"PositionerPrimaryAngle": 10.0 + f, "PositionerSecondaryAngle": 0.0}
        if f >= 4:  # the mask is moved right like the patient: DICOM column offset negative
            group["FramePixelShiftSequence"] = {"SubtractionItemID": 7, "MaskSubPixelShift": [0.0, -float(f - 3)]}
        per_frame.append(group)
    shared = functional_groups(
        [
            {
                "FramePixelDataPropertiesSequence": {"ImagerPixelSpacing": [0.15, 0.15]},
                "XRayGeometrySequence": {"DistanceSourceToIsocenter": 750.0, "DistanceSourceToDetector": 1200.0},
            }
        ]
    )
    item = {"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [2, 3], "ApplicableFrameRange": [5, 10]}
    item["SubtractionItemID"] = 7
    path = write_xa(
        tmp_path / "enhanced.dcm",
        frames,
        sop_class=ENHANCED_XA,
        mask_items=[item],
        extra={
            "PerFrameFunctionalGroupsSequence": functional_groups(per_frame),
            "SharedFunctionalGroupsSequence": shared,
        },
    )
    img = load_image(path)
    assert img.meta["sop_class"] == "Enhanced XA" and img.meta["mask_shifts"][9] == [0.0, 6.0]
    for f in range(4, 10):  # each frame matches its own patient position exactly (whole-pixel shifts)
        ideal = expected(OPACITY, moves[f])[..., f]
        np.testing.assert_allclose(img[0, 8:-8, :, f].numpy(), ideal[8:-8], atol=TOL)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:2], [0.15 * 750 / 1200] * 2, rtol=1e-6)
    assert img.meta["spacing_source"] == "ImagerPixelSpacing / (SID / SOD)"
    np.testing.assert_allclose(img.meta["frame_times_ms"], [50.0 * f for f in range(10)], atol=1e-3)
    assert img.meta["positioner_primary_angles"] == [10.0 + f for f in range(10)]


def test_spacing_rules_and_uncalibrated_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = Dataset()
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 1000, 800
    assert xa_spacing(ds).row_mm == pytest.approx(0.16) and xa_spacing(ds).plane == "isocentre"
    del ds.DistanceSourceToPatient
    detector = xa_spacing(ds)
    assert (detector.plane, detector.calibrated, detector.row_mm) == ("detector", False, 0.2)
    ds.PixelSpacing = [0.18, 0.17]
    assert (xa_spacing(ds).source, xa_spacing(ds).column_mm) == ("PixelSpacing", 0.17)
    frames = xa_frames(ROWS, COLS, OPACITY[:3])
    path = write_xa(tmp_path / "det.dcm", frames, extra={"ImagerPixelSpacing": [0.2, 0.2], "CineRate": 25})
    with caplog.at_level(logging.WARNING, logger="medseg.io.xa"):
        img = load_xa(path)
    assert "not calibrated" in caplog.text
    assert img.meta["spacing_plane"] == "detector" and img.meta["spacing_calibrated"] is False
    assert img.meta["frame_time_source"] == "CineRate" and img.meta["frame_times_ms"] == [0.0, 40.0, 80.0]
    single = load_xa(write_xa(tmp_path / "one.dcm", frames[:1]))
    assert tuple(single.shape) == (1, COLS, ROWS, 1) and single.meta["subtracted"] is False
    assert single.meta["spacing_plane"] is None


def test_bad_mask_descriptions_are_refused(tmp_path: Path) -> None:
    frames = xa_frames(ROWS, COLS, OPACITY[:4])
    cases = [
        ({"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [1, 5]}, r"MaskFrameNumbers \(0028,6110\) \[1, 5\]"),
        ({"MaskOperation": "AVG_SUB", "MaskFrameNumbers": [1], "ApplicableFrameRange": [2, 9]}, r"\(0028,6102\)"),
        ({"MaskOperation": "TID", "TIDOffset": 3, "ApplicableFrameRange": [2, 4]}, r"TIDOffset \(0028,6120\) 3"),
        ({"MaskOperation": "REV_TID", "TIDOffset": 1}, r"no ApplicableFrameRange \(0028,6102\)"),
    ]
    for k, (item, message) in enumerate(cases):
        with pytest.raises(DataError, match=message):
            load_xa(write_xa(tmp_path / f"bad{k}.dcm", frames, mask_items=[item]))
    with pytest.raises(ConfigError, match="mask_frames"):
        load_xa(write_xa(tmp_path / "ok.dcm", frames), mask_frames=[9])


def test_colour_and_non_xa_files_are_refused(tmp_path: Path) -> None:
    path = write_xa(
        tmp_path / "colour.dcm", xa_frames(ROWS, COLS, OPACITY[:2]), extra={"PhotometricInterpretation": "RGB"}
    )
    with pytest.raises(DataError, match=r"PhotometricInterpretation \(0028,0004\) is RGB"):
        load_xa(path)
    with pytest.raises(DataError, match="not an X-ray angiography image"):
        load_xa(get_testdata_file("CT_small.dcm"))
