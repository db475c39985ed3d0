"""DICOM series reading: series grouping and choice, geometry checks and the affine (pydicom), pixels (ITK/GDCM).

Headers are parsed with pydicom (``stop_before_pixels=True``); pixel data of the chosen, sorted file list is decoded
by ITK's GDCM reader, which applies RescaleSlope/RescaleIntercept and handles compressed transfer syntaxes.
Geometry that is non-finite or inconsistent is refused, never guessed (``docs/architecture.md``, "Geometry").
"""

from __future__ import annotations

import logging
import math
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import MetaTensor
from pydicom.errors import InvalidDicomError

from medseg.core.errors import DataError
from medseg.io.checks import ImageHeader, check_voxel_cap, size_error
from medseg.io.geometry import LPS_RAS_FLIP, spacing_from_affine, to_metatensor

logger = logging.getLogger(__name__)

__all__ = [
    "DicomSeries",
    "PixelClaim",
    "check_claim",
    "list_dicom_series",
    "pixel_claim",
    "read_dicom_series",
    "register_multiframe_adapter",
    "series_header",
    "sorted_series_files",
]

# Non-image objects that may share a study folder with the images.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "DOC", "REG"})
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", _DEFLATED})
# Transfer syntaxes whose pixels live on a JPIP server (JPIP / HTJ2K JPIP referenced, plain and deflated).
REFERENCED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"}
)
_DICOMDIR = "1.2.840.10008.1.3.10"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_GAP_TOLERANCE = 0.01  # relative deviation from the median slice gap
# Modality adapters (medseg.io.modality) offered a series that is one multi-frame file (XA run, US cine).
_MULTIFRAME_ADAPTERS: list[Any] = []
_DUPLICATE_MM = 1e-3  # slices closer than this along the normal are duplicates


@dataclass(frozen=True)
class _Instance:
    path: Path
    series_uid: str
    study_uid: str
    modality: str
    series_number: int | None
    description: str
    rows: int | None
    columns: int | None
    frames: int
    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    claim: PixelClaim


@dataclass(frozen=True)
class PixelClaim:
    """What one DICOM file's header says about its pixels, and how many pixel bytes it really holds.

    Attributes:
        rows, columns, samples, frames, bits_allocated: the header's values (None where absent or not an integer).
        pixel_representation: 0 unsigned, 1 signed (None where absent).
        transfer_syntax: the TransferSyntaxUID ("" if absent).
        element: the pixel data element number (0x0010 PixelData, 0x0008 float, 0x0009 double), None if absent.
        present: bytes in the pixel data element, None when encapsulated (compressed) or unknowable (deflated).
        available: bytes left in the file after the element's header (None where not measured).
    """

    rows: int | None
    columns: int | None
    samples: int | None
    frames: int | None
    bits_allocated: int | None
    pixel_representation: int | None
    transfer_syntax: str
    element: int | None
    present: int | None
    available: int | None

    @property
    def native(self) -> bool:
        return self.transfer_syntax in _NATIVE or not self.transfer_syntax

    @property
    def expected(self) -> int | None:
        """Pixel bytes the header implies for native (uncompressed) data."""
        if None in (self.rows, self.columns, self.samples, self.frames, self.bits_allocated):
            return None
        bits = self.rows * self.columns * self.samples * self.frames * self.bits_allocated  # type: ignore[operator]
        return (bits + 7) // 8

    @property
    def dtype(self) -> str:
        if self.element == 0x0008:
            return "float32"
        if self.element == 0x0009:
            return "float64"
        bits = self.bits_allocated if self.bits_allocated in (8, 16, 32, 64) else 8
        return f"{'int' if self.pixel_representation == 1 else 'uint'}{bits}"


@dataclass(frozen=True)
class DicomSeries:
    """Summary of one image series found in a folder.

    Args:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" if absent).
        modality: Modality (e.g. "CT", "MR").
        series_number: SeriesNumber, None if absent.
        n_instances: number of image files in the series.
    """

    uid: str
    description: str
    modality: str
    series_number: int | None
    n_instances: int

    def label(self) -> str:
        """One-line description used in logs and error messages."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.uid}{desc} ({self.modality}, {self.n_instances} instances)"


def float_values(value: Any) -> tuple[float, ...] | None:
    """Parse a DS/FD (multi-)value into floats; unparsable entries become NaN so the geometry check refuses them."""
    if value is None:
        return None
    items = [value] if isinstance(value, str | bytes) or not hasattr(value, "__iter__") else list(value)
    out = []
    for item in items:
        try:
            out.append(float(item))
        except (TypeError, ValueError):
            out.append(math.nan)
    return tuple(out)


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


def pixel_claim(fh: Any, ds: pydicom.Dataset, size: int) -> PixelClaim:
    """The pixel claim of a file read with ``stop_before_pixels`` from ``fh`` (positioned at the pixel element).

    Args:
        fh: the open binary file, just after pydicom's header read.
        ds: the dataset pydicom read.
        size: the file's size in bytes.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    element = present = available = None
    if syntax == _DEFLATED:  # pydicom inflated into its own buffer; the raw stream position means nothing
        element = 0x0010 if "Rows" in ds and "Columns" in ds else None
    else:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        order = "<" if little is not False else ">"
        head = fh.read(8)
        if len(head) == 8 and struct.unpack(order + "H", head[:2])[0] == 0x7FE0:
            element = struct.unpack(order + "H", head[2:4])[0]
            if implicit:
                length = struct.unpack(order + "I", head[4:8])[0]
            elif head[4:6] in _LONG_VRS:
                extra = fh.read(4)
                length = struct.unpack(order + "I", extra)[0] if len(extra) == 4 else 0
            else:
                length = struct.unpack(order + "H", head[6:8])[0]
            available = size - fh.tell()
            present = None if length == _UNDEFINED else length
    frames_raw = ds.get("NumberOfFrames", 1)
    return PixelClaim(
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        samples=_int_or_none(ds.get("SamplesPerPixel", 1)),
        frames=1 if frames_raw in (None, "") else _int_or_none(frames_raw),
        bits_allocated=_int_or_none(ds.get("BitsAllocated")),
        pixel_representation=_int_or_none(ds.get("PixelRepresentation")),
        transfer_syntax=syntax,
        element=element,
        present=present,
        available=available,
    )


def check_claim(claim: PixelClaim, path: Path, ds: Any = None) -> None:
    """Refuse a file whose header lies about its pixels (sizes, sample layout, bytes present, where they are).

    Raises:
        DataError: naming the field and the value found.
    """

    def bad(what: str, expected: str, hint: str = "the DICOM header is corrupt; re-export the file") -> DataError:
        return DataError(f"{path.name}: {what}", expected=expected, hint=hint, path=path)

    if claim.transfer_syntax in REFERENCED_SYNTAXES or (ds is not None and "PixelDataProviderURL" in ds):
        raise bad(
            "its pixel data is referenced from elsewhere (JPIP), not stored in the file",
            "pixel data stored in the file",
            "retrieve the image with its pixel data (e.g. WADO-RS) and send that file",
        )
    for name, value, lo, hi in (("Rows", claim.rows, 1, 65535), ("Columns", claim.columns, 1, 65535)):
        if value is None or not lo <= value <= hi:
            raise bad(f"{name} is {value}", f"{name} from {lo} to {hi}")
    if claim.samples not in (1, 3):
        raise bad(f"SamplesPerPixel is {claim.samples}", "1 (grey) or 3 (colour)")
    if claim.bits_allocated not in (1, 8, 16, 32, 64):
        raise bad(f"BitsAllocated is {claim.bits_allocated}", "1, 8, 16, 32 or 64")
    if claim.frames is None or claim.frames < 1:
        raise bad("NumberOfFrames is not a positive integer", "NumberOfFrames >= 1 (or absent)")
    expected = claim.expected
    if not claim.native or claim.present is None or expected is None:
        if claim.available is not None and claim.present is None and claim.available <= 0:
            raise size_error(path, "the encapsulated pixel data", 1, 0)
        return
    if claim.available is not None and claim.present > claim.available:
        raise size_error(path, f"PixelData claims {claim.present} bytes but the file", expected, claim.available)
    if claim.present not in (expected, expected + (expected % 2)):
        raise size_error(
            path, f"PixelData ({claim.rows}x{claim.columns}, {claim.bits_allocated} bits)", expected, claim.present
        )


def _parse(path: Path) -> _Instance | None:
    """Parse one file's header; None for non-DICOM or non-image files."""
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            claim = pixel_claim(fh, ds, path.stat().st_size)
            has_pixels = claim.element is not None
    except (InvalidDicomError, OSError, EOFError):
        return None
    except Exception as exc:  # a broken header must not stop the scan of the other files
        logger.warning("skipping %s: unreadable DICOM header (%s: %s)", path, type(exc).__name__, exc)
        return None
    modality = str(ds.get("Modality", "") or "").upper()
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not has_pixels or not uid or modality in NON_IMAGE_MODALITIES:
        return None
    frames = claim.frames if claim.frames is not None else 1
    ipp, iop = float_values(ds.get("ImagePositionPatient")), float_values(ds.get("ImageOrientationPatient"))
    if frames <= 1 and (ipp is None or iop is None):
        return None  # no patient geometry (e.g. secondary capture): not an image series we can place in space
    number = ds.get("SeriesNumber")
    try:
        series_number = None if number in (None, "") else int(number)
    except (TypeError, ValueError):
        series_number = None
    thickness = float_values(ds.get("SliceThickness"))
    return _Instance(
        path=path,
        series_uid=uid,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        modality=modality,
        series_number=series_number,
        description=str(ds.get("SeriesDescription", "") or ""),
        rows=ds.get("Rows"),
        columns=ds.get("Columns"),
        frames=frames,
        ipp=ipp,
        iop=iop,
        pixel_spacing=float_values(ds.get("PixelSpacing")),
        slice_thickness=thickness[0] if thickness else None,
        claim=claim,
    )


def _scan(folder: Path) -> dict[str, list[_Instance]]:
    if not folder.is_dir():
        raise DataError(f"DICOM folder {folder} not found", expected="an existing folder of DICOM files", path=folder)
    groups: dict[str, list[_Instance]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        inst = _parse(path)
        if inst is not None:
            groups[inst.series_uid].append(inst)
    return dict(groups)


def _summaries(groups: dict[str, list[_Instance]]) -> list[DicomSeries]:
    out = []
    for uid, items in groups.items():
        first = items[0]
        out.append(DicomSeries(uid, first.description, first.modality, first.series_number, len(items)))
    # Most instances first, then lowest SeriesNumber (missing numbers last), then UID.
    out.sort(key=lambda s: (-s.n_instances, s.series_number if s.series_number is not None else math.inf, s.uid))
    return out


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """List the image series under ``folder`` (searched recursively), in the order :func:`read_dicom_series` prefers.

    Args:
        folder: folder holding DICOM files, possibly in sub-folders and mixed with other files.

    Returns:
        One :class:`DicomSeries` per SeriesInstanceUID whose files carry pixel data and patient geometry; SEG,
        RTSTRUCT, SR, PR and non-DICOM files are ignored.
    """
    return _summaries(_scan(Path(folder)))


def _choose(groups: dict[str, list[_Instance]], series_uid: str | None, folder: Path) -> str:
    series = _summaries(groups)
    if not series:
        raise DataError(
            f"no DICOM image series found in {folder}",
            expected="DICOM files with PixelData, ImagePositionPatient and ImageOrientationPatient",
            hint="check the folder holds the image files, not only SEG/RTSTRUCT/SR objects",
            path=folder,
        )
    if series_uid is not None:
        if series_uid not in groups:
            available = "; ".join(s.label() for s in series)
            raise DataError(
                f"series {series_uid} not found in {folder}",
                expected=f"one of: {available}",
                hint="pass one of the listed SeriesInstanceUIDs",
                path=folder,
            )
        return series_uid
    chosen = series[0]
    if len(series) > 1:
        others = "; ".join(s.label() for s in series[1:])
        logger.info("%s: chose series %s; also present: %s", folder, chosen.label(), others)
    else:
        logger.info("%s: reading series %s", folder, chosen.label())
    return chosen.uid


def register_multiframe_adapter(adapter: Any) -> None:
    """Offer ``adapter`` (``detect(path)``, ``load(path, max_voxels=)``, ``header(path, max_voxels=)``) the series
    that are one multi-frame file; :func:`read_dicom_series` and :func:`series_header` hand such a series to the
    first adapter that detects it instead of refusing it."""
    if adapter not in _MULTIFRAME_ADAPTERS:
        _MULTIFRAME_ADAPTERS.append(adapter)


def _multiframe_adapter(items: list[_Instance]) -> Any:
    if len(items) != 1 or items[0].frames <= 1:
        return None
    return next((a for a in _MULTIFRAME_ADAPTERS if a.detect(items[0].path)), None)


def _refuse(folder: Path, what: str, expected: str, hint: str | None = None) -> DataError:
    return DataError(f"DICOM series in {folder}: {what}", expected=expected, hint=hint, path=folder)


def _sort_and_affine(items: list[_Instance], folder: Path) -> tuple[list[Path], np.ndarray]:
    """Check the series geometry, sort the slices along the normal and build the RAS affine ``(4, 4)``."""
    if any(i.frames > 1 for i in items):
        raise _refuse(folder, "multi-frame images (NumberOfFrames > 1) are not supported yet", "single-frame slices")
    first = items[0]
    for inst in items:
        check_claim(inst.claim, inst.path)
        if (inst.claim.bits_allocated, inst.claim.samples) != (first.claim.bits_allocated, first.claim.samples):
            raise _refuse(
                folder,
                f"slice {inst.path.name} has {inst.claim.bits_allocated} bits x {inst.claim.samples} samples but "
                f"{first.path.name} has {first.claim.bits_allocated} x {first.claim.samples}",
                "the same BitsAllocated and SamplesPerPixel in every slice",
            )
        if (inst.rows, inst.columns) != (first.rows, first.columns):
            raise _refuse(
                folder,
                f"slice {inst.path.name} is {inst.rows}x{inst.columns} but {first.path.name} is "
                f"{first.rows}x{first.columns}",
                "the same Rows/Columns in every slice",
            )
        ps = inst.pixel_spacing
        if ps is None or len(ps) != 2 or not all(math.isfinite(v) and v > 0 for v in ps):
            raise _refuse(
                folder,
                f"slice {inst.path.name} has invalid PixelSpacing {ps}",
                "two finite, positive PixelSpacing values (mm)",
                "the pixel spacing is unknown; fix the header rather than guess it",
            )
        assert first.pixel_spacing is not None  # items[0] passed the check above in the first iteration
        if not np.allclose(ps, first.pixel_spacing, rtol=0.0, atol=1e-4):
            raise _refuse(folder, f"PixelSpacing differs between slices ({first.pixel_spacing} vs {ps})", "one value")
        for name, value, size in (("ImagePositionPatient", inst.ipp, 3), ("ImageOrientationPatient", inst.iop, 6)):
            if value is None or len(value) != size or not all(math.isfinite(v) for v in value):
                raise _refuse(folder, f"slice {inst.path.name} has invalid {name} {value}", f"{size} finite values")
        assert inst.iop is not None and first.iop is not None  # checked just above (items[0] in the first iteration)
        if not np.allclose(inst.iop, first.iop, rtol=0.0, atol=1e-4):
            raise _refuse(
                folder,
                f"ImageOrientationPatient differs between slices ({first.iop} vs {inst.iop})",
                "one orientation for the whole series",
            )
    iop = np.asarray(first.iop, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise _refuse(folder, f"ImageOrientationPatient {first.iop} is not two orthonormal vectors", "unit cosines")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    positions = np.asarray([i.ipp for i in items], dtype=np.float64)
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    items, positions, proj = [items[k] for k in order], positions[order], proj[order]
    if len(items) > 1:
        gaps = np.diff(proj)
        dup = int(np.argmin(gaps))
        if gaps[dup] < _DUPLICATE_MM:
            raise _refuse(
                folder,
                f"duplicate slice positions ({items[dup].path.name} and {items[dup + 1].path.name} both at "
                f"{proj[dup]:.4f} mm along the normal)",
                "one slice per position",
                "the folder may mix two acquisitions of one series; pass series_uid or separate them",
            )
        gap = float(np.median(gaps))
        if np.max(np.abs(gaps - gap)) > _GAP_TOLERANCE * gap:
            raise _refuse(
                folder,
                f"inconsistent slice gaps (min {gaps.min():.4f} mm, max {gaps.max():.4f} mm, median {gap:.4f} mm)",
                f"evenly spaced slices (within {_GAP_TOLERANCE:.0%} of the median gap)",
                "slices are missing or the series is irregular; resample it before use",
            )
        drift = positions[-1] - positions[0] - normal * (proj[-1] - proj[0])
        if np.linalg.norm(drift) > _GAP_TOLERANCE * (proj[-1] - proj[0]):
            raise _refuse(
                folder,
                f"slice positions move {np.linalg.norm(drift):.3f} mm within the slice plane (gantry tilt or shear)",
                "slice positions along the slice normal",
            )
    else:
        thick = first.slice_thickness
        gap = float(thick) if thick is not None and math.isfinite(thick) and thick > 0 else 1.0
    assert first.pixel_spacing is not None  # checked in the loop above
    row_spacing, col_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = normal * gap
    lps[:3, 3] = positions[0]
    return [i.path for i in items], LPS_RAS_FLIP @ lps


def sorted_series_files(folder: str | Path, *, series_uid: str | None = None) -> tuple[str, list[Path], np.ndarray]:
    """The series :func:`read_dicom_series` would read, without decoding pixels: its UID, files and affine.

    Same series rule, geometry checks and slice order as :func:`read_dicom_series`, so ``paths[k]`` is the file of
    slice ``Z = k`` of the volume it returns (writers such as DICOM SEG use this to map a mask back to instances).

    Args:
        folder: folder of DICOM files (searched recursively).
        series_uid: SeriesInstanceUID to use, or None to choose as :func:`read_dicom_series` does.

    Returns:
        ``(series_uid, paths in slice order, RAS affine (4, 4))``.

    Raises:
        DataError: no image series, unknown ``series_uid`` or refused geometry.
    """
    folder = Path(folder)
    groups = _scan(folder)
    uid = _choose(groups, series_uid, folder)
    paths, affine = _sort_and_affine(groups[uid], folder)
    return uid, paths, affine


def _series_header(folder: Path, items: list[_Instance], affine: np.ndarray, max_voxels: int | None) -> ImageHeader:
    first = items[0]
    claims = [i.claim for i in items]
    shape = (int(first.columns or 0), int(first.rows or 0), len(items))
    voxels = shape[0] * shape[1] * shape[2] * int(first.claim.samples or 1)
    check_voxel_cap(folder, voxels, max_voxels)
    expected = [c.expected for c in claims]
    present = [c.present for c in claims]
    spacing = spacing_from_affine(affine)
    return ImageHeader(
        path=folder,
        format="dicom",
        shape=shape,
        channels=int(first.claim.samples or 1),
        voxels=voxels,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        dtype=first.claim.dtype,
        data_file=folder,
        bytes_expected=sum(e for e in expected if e is not None) if None not in expected else None,
        bytes_present=sum(p for p in present if p is not None) if None not in present else None,
        compression="none" if first.claim.native else first.claim.transfer_syntax,
    )


def series_header(folder: str | Path, *, series_uid: str | None = None, max_voxels: int | None = None) -> ImageHeader:
    """The :class:`~medseg.io.checks.ImageHeader` of the series :func:`read_dicom_series` would read, from headers only.

    Applies every check of :func:`read_dicom_series` that needs no pixel decoding (series rule, geometry, the pixel
    bytes of each file against its Rows/Columns/BitsAllocated/SamplesPerPixel) and the voxel cap.

    Raises:
        DataError: as :func:`read_dicom_series`, or more than ``max_voxels`` voxels.
    """
    folder = Path(folder)
    groups = _scan(folder)
    uid = _choose(groups, series_uid, folder)
    adapter = _multiframe_adapter(groups[uid])
    if adapter is not None:
        return adapter.header(groups[uid][0].path, max_voxels=max_voxels)
    _, affine = _sort_and_affine(groups[uid], folder)
    return _series_header(folder, groups[uid], affine, max_voxels)


def _decode(paths: list[Path], folder: Path) -> np.ndarray:
    """Decode the slices with ITK/GDCM in exactly the given order; returns ``(X, Y, Z)`` float32 (rescaled)."""
    import itk  # slow to import: only when DICOM pixels are needed

    try:
        reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New()
        reader.SetImageIO(itk.GDCMImageIO.New())
        reader.SetFileNames([str(p) for p in paths])
        reader.Update()
        zyx = itk.array_from_image(reader.GetOutput())
    except Exception as exc:  # ITK raises plain RuntimeError for every decode problem
        raise DataError(
            f"could not decode the pixel data of the DICOM series in {folder} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})",
            expected="pixel data in a transfer syntax GDCM can decode",
            path=folder,
        ) from exc
    return np.ascontiguousarray(np.transpose(zyx, (2, 1, 0)), dtype=np.float32)


def read_dicom_series(
    folder: str | Path,
    *,
    series_uid: str | None = None,
    display_name: str | None = None,
    max_voxels: int | None = None,
) -> MetaTensor:
    """Read one DICOM image series from a folder (searched recursively).

    Series rule: if ``series_uid`` is given, that series is read (an unknown UID raises, listing the available
    series with descriptions and instance counts). Otherwise only image series are considered - instances with
    PixelData, ImagePositionPatient and ImageOrientationPatient; SEG/RTSTRUCT/SR/PR objects and non-DICOM files are
    ignored - and the series with the most instances is chosen, ties broken by the lowest SeriesNumber, then the
    UID. The choice and the alternatives are logged.

    Geometry: slices are sorted by the projection of ImagePositionPatient on the slice normal (row cosine x column
    cosine). The series is refused if PixelSpacing is non-finite or non-positive, IPP/IOP are non-finite, IOP or
    Rows/Columns differ between slices, two slices share a position, slice gaps deviate by more than 1 % from the
    median gap, or the images are multi-frame. The LPS affine has columns ``row_cosine * column_spacing``,
    ``column_cosine * row_spacing``, ``normal * slice_gap`` and the first slice's IPP; a single slice uses
    SliceThickness (or 1 mm) as gap.

    Args:
        folder: folder of DICOM files.
        series_uid: SeriesInstanceUID to read, or None to choose as above.
        display_name: name stored as ``filename_or_obj`` (e.g. the original zip), defaults to ``folder``.
        max_voxels: refuse a series of more voxels than this before decoding (None: no cap).

    Returns:
        ``MetaTensor`` ``(1, X, Y, Z)`` float32 (X = column index, Y = row index, Z = slice) in rescaled units (e.g.
        HU), RAS affine; meta has ``source_format="dicom"``, ``series_uid``, ``study_uid``, ``modality``.

    Raises:
        DataError: no image series, unknown ``series_uid``, refused geometry, pixel data shorter or longer than
            the headers imply, more than ``max_voxels`` voxels, or undecodable pixel data.
    """
    folder = Path(folder)
    groups = _scan(folder)
    uid = _choose(groups, series_uid, folder)
    items = groups[uid]
    adapter = _multiframe_adapter(items)
    if adapter is not None:
        return adapter.load(items[0].path, max_voxels=max_voxels)
    paths, affine = _sort_and_affine(items, folder)
    _series_header(folder, items, affine, max_voxels)
    volume = _decode(paths, folder)
    first = items[0]
    expected_shape = (first.columns, first.rows, len(paths))
    if volume.shape != expected_shape:
        raise DataError(
            f"decoded DICOM series in {folder} has shape {volume.shape}",
            expected=f"{expected_shape} from the headers (Columns, Rows, slices)",
            path=folder,
        )
    meta = {
        "filename_or_obj": str(display_name if display_name is not None else folder),
        "source_format": "dicom",
        "series_uid": uid,
        "study_uid": first.study_uid,
        "modality": first.modality,
        "series_description": first.description,
    }
    return to_metatensor(volume[None], affine, meta)
