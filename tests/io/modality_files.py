"""Synthetic X-ray angiography and ultrasound DICOM files with known answers (written with pydicom).

The XA phantom is a projection through a smooth random "anatomy" (Gaussian blobs of attenuation) and a vessel tree
(three curved vessels of Gaussian profile) whose contrast arrives over time: the stored intensity of frame ``t`` is
``I0 * exp(-(mu_bg(r - dr_t, c - dc_t) + opacity[t] * mu_vessel(r - dr_t, c - dc_t)))`` for a patient displaced by
``(dr_t, dc_t)`` pixels at that frame, evaluated analytically so that sub-pixel displacements are exact.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
I0 = 20000.0


def anatomy(rows: int, cols: int, shift: Sequence[float] = (0.0, 0.0), seed: int = 3) -> tuple[np.ndarray, ...]:
    """``(mu_bg, mu_vessel)`` ``(rows, cols)`` float64 of the phantom displaced by ``shift`` = (rows, cols)."""
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(rows) - shift[0], np.arange(cols) - shift[1], indexing="ij")
    mu_bg = np.full((rows, cols), 0.6)
    for _ in range(40):
        r0, c0 = rng.uniform(0, rows), rng.uniform(0, cols)
        sigma = rng.uniform(0.04, 0.12) * min(rows, cols)
        mu_bg += rng.uniform(0.05, 0.25) * np.exp(-((r - r0) ** 2 + (c - c0) ** 2) / (2 * sigma**2))
    for _ in range(150):  # fine anatomical texture (band-limited plane waves), which registration needs
        wavelength, angle, phase = rng.uniform(3, 25), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = (r * np.cos(angle) + c * np.sin(angle)) / wavelength
        mu_bg += 0.3 / np.sqrt(150) * np.cos(2 * np.pi * wave + phase)
    mu_vessel = np.zeros((rows, cols))
    for k in range(3):  # curved vessels: distance to a sine-shaped centre line, Gaussian profile of width ~1.5 px
        centre = rows * (0.25 + 0.25 * k) + 0.08 * rows * np.sin(2 * np.pi * c / cols + k)
        mu_vessel += 0.4 * np.exp(-((r - centre) ** 2) / (2 * 1.5**2))
    return mu_bg, mu_vessel


def xa_frames(
    rows: int, cols: int, opacity: Sequence[float], shifts: Sequence[Sequence[float]] | None = None
) -> np.ndarray:
    """Stored uint16 frames ``(T, rows, cols)`` of the phantom (LIN data)."""
    shifts = shifts if shifts is not None else [(0.0, 0.0)] * len(opacity)
    out = np.empty((len(opacity), rows, cols), dtype=np.uint16)
    cache: dict[tuple[float, float], tuple[np.ndarray, ...]] = {}
    for t, (value, shift) in enumerate(zip(opacity, shifts, strict=True)):
        key = (float(shift[0]), float(shift[1]))
        if key not in cache:
            cache[key] = anatomy(rows, cols, key)
        mu_bg, mu_vessel = cache[key]
        out[t] = np.round(I0 * np.exp(-(mu_bg + value * mu_vessel)))
    return out


def _file_meta(sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    return meta


def _base(sop_class: str, modality: str, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(sop_class, ds.SOPInstanceUID, syntax)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "phantom"
    ds.SeriesNumber = 1
    return ds


def write_xa(
    path: Path,
    frames: np.ndarray,
    *,
    sop_class: str = XA_IMAGE,
    relationship: str = "LIN",
    mask_items: Sequence[dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``frames`` ``(T, rows, cols)`` uint16 as an XA / Enhanced XA file; ``mask_items`` become the Mask
    Subtraction Sequence (keyword -> value per item); ``extra`` sets further top-level attributes."""
    ds = _base(sop_class, "XA")
    n, rows, cols = frames.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if n > 1 or sop_class == ENHANCED_XA:
        ds.NumberOfFrames = n
    ds.PixelIntensityRelationship = relationship
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    if mask_items:
        ds.MaskSubtractionSequence = DicomSequence([_item(spec) for spec in mask_items])
        ds.RecommendedViewingMode = "SUB"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _item(spec: dict[str, Any]) -> Dataset:
    item = Dataset()
    for keyword, value in spec.items():
        setattr(item, keyword, value)
    return item


def functional_groups(per_frame: Sequence[dict[str, dict[str, Any] | list[dict[str, Any]]]]) -> DicomSequence:
    """A functional groups sequence: per item, sequence keyword -> one item's attributes (or a list of items)."""
    groups = []
    for spec in per_frame:
        group = Dataset()
        for seq_keyword, content in spec.items():
            items = content if isinstance(content, list) else [content]
            setattr(group, seq_keyword, DicomSequence([_item(i) for i in items]))
        groups.append(group)
    return DicomSequence(groups)


def write_us(
    path: Path,
    frames: np.ndarray,
    *,
    regions: Sequence[dict[str, Any]] = (),
    photometric: str | None = None,
    extra: dict[str, Any] | None = None,
    jpeg_frames: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write ``frames`` ``(T, rows, cols[, 3])`` uint8 as a US (multi-frame) file with the given regions.

    With ``jpeg_frames`` the pixel data is those arrays JPEG-encoded (one per frame, each of its own size) instead.
    """
    n, rows, cols = frames.shape[:3]
    colour = frames.ndim == 4
    syntax = JPEGBaseline8Bit if jpeg_frames is not None else ExplicitVRLittleEndian
    ds = _base(US_MULTIFRAME if n > 1 else US_IMAGE, "US", syntax)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if n > 1:
        ds.NumberOfFrames = n
        ds.FrameTime = "40"
        ds.FrameIncrementPointer = 0x00181063
    if regions:
        ds.SequenceOfUltrasoundRegions = DicomSequence([_item(spec) for spec in regions])
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if jpeg_frames is not None:
        from PIL import Image
        from pydicom.encaps import encapsulate

        encoded = []
        for frame in jpeg_frames:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def region(x0: int, y0: int, x1: int, y1: int, delta_cm: float = 0.02, **changes: Any) -> dict[str, Any]:
    """A 2D tissue region in cm (the keyword -> value spec :func:`write_us` takes)."""
    spec: dict[str, Any] = {
        "RegionSpatialFormat": 1,
        "RegionDataType": 1,
        "RegionFlags": 0,
        "RegionLocationMinX0": x0,
        "RegionLocationMinY0": y0,
        "RegionLocationMaxX1": x1,
        "RegionLocationMaxY1": y1,
        "PhysicalUnitsXDirection": 3,
        "PhysicalUnitsYDirection": 3,
        "PhysicalDeltaX": delta_cm,
        "PhysicalDeltaY": delta_cm,
    }
    spec.update(changes)
    return spec


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)
