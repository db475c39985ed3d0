"""Shared fixtures for medseg.io tests: oblique geometry, label phantoms and synthetic DICOM series."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SHAPE = (20, 24, 16)
SPACING = (0.7, 1.3, 3.0)
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A random proper rotation (det +1), far from axis-aligned with overwhelming probability."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """RAS affine (4, 4): random rotation, anisotropic spacing (0.7, 1.3, 3.0), non-zero origin."""
    rng = np.random.default_rng(1234)
    affine = np.eye(4)
    affine[:3, :3] = random_rotation(rng) * np.asarray(SPACING)[None, :]
    affine[:3, 3] = (12.25, -45.5, 78.75)
    return affine


@pytest.fixture
def phantom() -> np.ndarray:
    """Labels (X, Y, Z) = SHAPE, uint8: a sphere (label 1) and a box (label 2) at known voxel indices."""
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[(ii - 12) ** 2 + (jj - 14) ** 2 + (kk - 9) ** 2 <= 16] = 1
    labels[2:6, 3:9, 1:5] = 2
    return labels


@pytest.fixture
def intensity() -> np.ndarray:
    """Seeded float32 image (X, Y, Z) = SHAPE."""
    return np.random.default_rng(7).normal(100.0, 20.0, size=SHAPE).astype(np.float32)


@dataclass
class Series:
    """What a synthetic DICOM series was built from."""

    uid: str
    files: list[Path]  # in slice order (sorted along the normal)
    affine_ras: np.ndarray
    slopes: list[float] = field(default_factory=list)
    intercepts: list[float] = field(default_factory=list)


def _ds(value: float) -> str:
    return f"{value:.6f}"[:16]


def write_series(
    folder: Path,
    *,
    n: int,
    iop: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin: Sequence[float] = (-80.0, -90.0, 30.0),
    pixel_spacing: Sequence[float | str] = (0.8, 0.6),
    gap: float = 2.5,
    positions: Sequence[Sequence[float]] | None = None,
    series_number: int = 1,
    description: str = "synthetic",
    seed: int = 0,
    vary_rescale: bool = True,
) -> Series:
    """Write ``n`` slices derived from pydicom's CT_small.dcm into ``folder`` under shuffled random file names.

    Each slice gets distinct pixel values (rolled and offset by its index) and, if ``vary_rescale``, its own
    RescaleSlope/RescaleIntercept, so mis-ordered or un-rescaled decoding is detected.
    """
    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base_pixels = base.pixel_array.astype(np.int16)
    uid = generate_uid(entropy_srcs=[f"series-{seed}-{series_number}"])
    row_cos, col_cos = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row_cos, col_cos)
    if positions is None:
        positions = [np.asarray(origin) + k * gap * normal for k in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    files, slopes, intercepts = [], [], []
    for k in range(n):
        ds = copy.deepcopy(base)
        pixels = np.roll(base_pixels, 3 * k, axis=0) + np.int16(5 * k)
        ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.PixelSpacing = [v if isinstance(v, str) else _ds(v) for v in pixel_spacing]
        ds.SliceThickness = _ds(gap)
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        slope, intercept = (1.0 + (k % 2), -1024.0 + 10 * k) if vary_rescale else (1.0, -1024.0)
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        sop = generate_uid(entropy_srcs=[uid, str(k)])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        files.append(ds)
        slopes.append(slope)
        intercepts.append(intercept)
    paths: list[Path | None] = [None] * n
    for k in rng.permutation(n):  # write in shuffled order under random names
        path = folder / f"{rng.integers(1e9):09d}.dcm"
        files[k].save_as(path)
        paths[k] = path
    lps = np.eye(4)
    ps = [float(v) for v in pixel_spacing]
    lps[:3, 0] = row_cos * ps[1]
    lps[:3, 1] = col_cos * ps[0]
    lps[:3, 2] = normal * gap
    lps[:3, 3] = positions[0]
    return Series(uid, [p for p in paths if p is not None], FLIP @ lps, slopes, intercepts)


def expected_volume(series: Series) -> np.ndarray:
    """(X, Y, Z) float: pydicom's pixel_array * slope + intercept per slice, in slice order."""
    slices = []
    for path in series.files:
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        slices.append((ds.pixel_array.astype(np.float64) * slope + intercept).T)  # (rows, cols) -> (X=col, Y=row)
    return np.stack(slices, axis=-1)


OBLIQUE_IOP = (0.866025, 0.5, 0.0, -0.482963, 0.836516, -0.258819)  # 30° in-plane, 15° tilt


@dataclass
class DicomFolder:
    folder: Path
    big: Series
    small: Series


@pytest.fixture
def dicom_folder(tmp_path: Path) -> DicomFolder:
    """A folder with an oblique 6-slice series, a 2-slice axial series (sub-folder), an SR and non-DICOM files."""
    folder = tmp_path / "study"
    big = write_series(folder, n=6, iop=OBLIQUE_IOP, origin=(-158.1, -179.0, -75.7), gap=2.5, seed=1)
    small = write_series(folder / "sub" / "deeper", n=2, series_number=2, description="scout", seed=2)
    (folder / "README.txt").write_text("not a DICOM file\n")
    (folder / "junk.dcm").write_bytes(np.random.default_rng(3).bytes(2000))
    report = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del report.PixelData
    report.Modality = "SR"
    report.SeriesInstanceUID = generate_uid(entropy_srcs=["report"])
    report.save_as(folder / "report.dcm")
    return DicomFolder(folder, big, small)


@pytest.fixture
def series_writer() -> Callable[..., Series]:
    """The :func:`write_series` factory, for tests that build their own (possibly broken) series."""
    return write_series


@pytest.fixture
def volume_of() -> Callable[[Series], np.ndarray]:
    """The :func:`expected_volume` helper."""
    return expected_volume
