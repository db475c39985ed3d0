"""Ultrasound (US Image, US Multi-frame): frames as ``(C, X, Y, T)`` volumes cropped to the calibrated region.

:func:`load_ultrasound` returns a float32 ``MetaTensor`` ``(C, X, Y, T)`` in medseg's 2D convention: ``X`` is the
column index, ``Y`` the row index, ``T`` the frame of a cine loop (``T = 1`` for a single image); ``C = 1`` for grey
or luminance, ``C = 3`` for colour kept as RGB.

Pixel size comes from the Sequence of Ultrasound Regions (0018,6011) only (:func:`ultrasound_regions`): a region
counts when its Region Spatial Format is 1 (2D), its Region Data Type 1 (tissue) or 2 (colour flow) and its
Physical Units are cm (3) in both directions; its bounds are clipped to the image; spacing is ``10 * |Physical
Delta|`` mm. Of several such regions (a dual view) the largest is used, ties to the first, and the meta says which.
With none, the image is loaded uncropped at 1 mm with ``spacing_calibrated=False`` and a logged warning - never a
silent 1 mm. By default the frames are cropped to the chosen region's box (``crop=False`` keeps the full frame); the
affine's origin is the box's corner, so a cropped pixel keeps its position in mm, and
:meth:`UltrasoundAdapter.restore_mask` pastes a mask back onto the full frame (zero outside the box).

Colour (RGB, YBR decoded to RGB, PALETTE COLOR through its lookup table) becomes luminance (``0.299 R + 0.587 G +
0.114 B``) unless it carries colour flow: the chosen region is colour flow (data type 2), Ultrasound Color Data
Present (0028,0014) is 1, or - when no region describes the image - more than 1 % of the pixels are clearly
coloured (channel spread above 1/8 of the range). Pixels are display-ready; use the ``us`` intensity preset
(percentile scaling). The fan shape is not in DICOM and is not derived here. See ``docs/modalities.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io.checks import ImageHeader, check_voxel_cap
from medseg.io.dicom import float_values
from medseg.io.geometry import check_affine, to_metatensor
from medseg.io.modality import (
    ModalityAdapter,
    check_options,
    decode_frames,
    frame_times,
    header_dataset,
    read_dicom_header,
    register_adapter,
    sop_class_of,
)

logger = logging.getLogger(__name__)

__all__ = [
    "US_SOP_CLASSES",
    "USRegion",
    "UltrasoundAdapter",
    "load_ultrasound",
    "restore_ultrasound_mask",
    "ultrasound_header",
    "ultrasound_regions",
]

US_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6.1": "US Image",
    "1.2.840.10008.5.1.4.1.1.3.1": "US Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.6": "US Image (retired)",
    "1.2.840.10008.5.1.4.1.1.3": "US Multi-frame Image (retired)",
}
_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
_COLOUR_MODES = ("auto", "rgb", "luminance")
_OPTIONS = ("crop", "colour", "region")
_KNOWN_UNITS = range(
    0, 0x0D
)  # PS3.3 C.8.5.5.1.15: none, percent, dB, cm, s, Hz, dB/s, cm/s, cm2, cm2/s, cm3, cm3/s, deg
_CM = 3
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
_CHROMA_FRACTION = 0.01
_BOUND_TAGS = (
    ("RegionLocationMinX0", "(0018,6018)"),
    ("RegionLocationMinY0", "(0018,601A)"),
    ("RegionLocationMaxX1", "(0018,601C)"),
    ("RegionLocationMaxY1", "(0018,601E)"),
)


@dataclass(frozen=True)
class USRegion:
    """One usable ultrasound region.

    Attributes:
        index: 0-based position in the Sequence of Ultrasound Regions.
        data_type: Region Data Type (1 tissue, 2 colour flow).
        box: ``(x0, y0, x1, y1)`` inclusive pixel bounds (columns, rows) clipped to the image.
        stated_box: the bounds as the file states them.
        row_mm, column_mm: spacing between rows (``10 * |PhysicalDeltaY|``) and columns (``10 * |PhysicalDeltaX|``).
    """

    index: int
    data_type: int
    box: tuple[int, int, int, int]
    stated_box: tuple[int, int, int, int]
    row_mm: float
    column_mm: float

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0] + 1) * (self.box[3] - self.box[1] + 1)


def _region_error(path: Path, index: int, what: str, expected: str) -> DataError:
    return DataError(
        f"{path.name}: ultrasound region {index + 1} (SequenceOfUltrasoundRegions (0018,6011)) {what}",
        expected=expected,
        hint="the region calibration is corrupt; re-export the image from the scanner",
        path=path,
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def ultrasound_regions(ds: Any, path: Path) -> list[USRegion]:
    """The usable regions of ``ds`` by the rule of the module docstring, in file order.

    Raises:
        DataError: a 2D tissue / colour-flow region in unknown units (naming PhysicalUnitsXDirection (0018,6024) or
            PhysicalUnitsYDirection (0018,6026)), with inverted bounds or bounds entirely outside the image (naming
            the RegionLocation attributes).
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    out: list[USRegion] = []
    for index, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        data_type = _int(item.get("RegionDataType"))
        if _int(item.get("RegionSpatialFormat")) != 1 or data_type not in (1, 2):
            continue
        units = []
        for keyword, tag in (("PhysicalUnitsXDirection", "(0018,6024)"), ("PhysicalUnitsYDirection", "(0018,6026)")):
            unit = _int(item.get(keyword))
            if unit not in _KNOWN_UNITS:
                raise _region_error(
                    path, index, f"has {keyword} {tag} {item.get(keyword)!r}", "a defined unit code (3 = cm)"
                )
            units.append(unit)
        if units != [_CM, _CM]:
            logger.info("%s: ultrasound region %d is not in cm (units %s); not used", path.name, index + 1, units)
            continue
        bounds = [_int(item.get(k)) for k, _ in _BOUND_TAGS]
        names = " ".join(f"{k} {t}" for k, t in _BOUND_TAGS)
        if None in bounds:
            raise _region_error(path, index, f"lacks bounds ({names}: {bounds})", "four integer pixel bounds")
        x0, y0, x1, y1 = (int(b) for b in bounds)  # type: ignore[arg-type]
        if x0 > x1 or y0 > y1:
            raise _region_error(
                path, index, f"has inverted bounds {names} = {bounds}", "MinX0 <= MaxX1, MinY0 <= MaxY1"
            )
        if x0 > columns - 1 or y0 > rows - 1 or x1 < 0 or y1 < 0:
            raise _region_error(
                path,
                index,
                f"lies entirely outside the {columns} x {rows} image ({names} = {bounds})",
                f"bounds overlapping columns 0..{columns - 1} and rows 0..{rows - 1}",
            )
        deltas = float_values([item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY")]) or (math.nan, math.nan)
        if not all(math.isfinite(d) and d != 0 for d in deltas):
            logger.warning(
                "%s: ultrasound region %d has PhysicalDeltaX/Y %s; not used", path.name, index + 1, list(deltas)
            )
            continue
        box = (max(x0, 0), max(y0, 0), min(x1, columns - 1), min(y1, rows - 1))
        out.append(USRegion(index, int(data_type), box, (x0, y0, x1, y1), 10 * abs(deltas[1]), 10 * abs(deltas[0])))
    return out


def _choose(regions: list[USRegion], wanted: int | None, path: Path) -> tuple[USRegion | None, str | None]:
    if wanted is not None:
        found = [r for r in regions if r.index == wanted]
        if not found:
            raise ConfigError(
                f"ultrasound region {wanted} is not a usable region of {path.name}",
                expected=f"one of {[r.index for r in regions]} (0-based indices of usable regions)",
                path=path,
            )
        return found[0], "option"
    if not regions:
        return None, None
    best = max(regions, key=lambda r: (r.area, -r.index))  # the largest; ties go to the first
    return best, "only" if len(regions) == 1 else f"largest of {len(regions)}"


def _options(options: Mapping[str, Any]) -> tuple[bool, str, int | None]:
    check_options("ultrasound", options, _OPTIONS)
    colour = options.get("colour", "auto")
    if colour not in _COLOUR_MODES:
        raise ConfigError(f"unknown ultrasound colour mode {colour!r}", expected=f"one of {_COLOUR_MODES}")
    region = options.get("region")
    return bool(options.get("crop", True)), str(colour), None if region is None else int(region)


def _is_colour(head: Any) -> bool:
    photometric = str(head.get("PhotometricInterpretation", "") or "").upper()
    return photometric == "PALETTE COLOR" or _int(head.get("SamplesPerPixel")) == 3


def _flow_flag(head: Any) -> bool:
    return _int(head.get("UltrasoundColorDataPresent")) == 1


def _has_chroma(frames: np.ndarray) -> bool:
    """Whether more than 1 % of the pixels of a few sampled frames ``(T, R, C, 3)`` are clearly coloured."""
    picks = sorted({0, frames.shape[0] // 2, frames.shape[0] - 1})
    sample = frames[picks]
    top = float(sample.max()) if sample.size else 0.0
    if top <= 0:
        return False
    spread = sample.max(axis=-1).astype(np.float32) - sample.min(axis=-1).astype(np.float32)
    return float((spread > top / 8.0).mean()) > _CHROMA_FRACTION


def ultrasound_header(path: str | Path, *, max_voxels: int | None = None) -> ImageHeader:
    """The :class:`~medseg.io.checks.ImageHeader` of what :func:`load_ultrasound` returns by default (cropped).

    ``channels`` is 3 for a colour file that no region describes (the pixels decide, so it is an upper bound).
    """
    p = Path(path)
    head, claim = read_dicom_header(p)
    _check_us(head, p)
    region, _ = _choose(ultrasound_regions(head, p), None, p)
    frames = int(claim.frames or 1)
    if region is None:
        box = (0, 0, int(claim.columns or 0) - 1, int(claim.rows or 0) - 1)
        spacing = (1.0, 1.0)
    else:
        box, spacing = region.box, (region.column_mm, region.row_mm)
    shape = (box[2] - box[0] + 1, box[3] - box[1] + 1, frames)
    keep = _is_colour(head) and (region is None or region.data_type == 2 or _flow_flag(head))
    channels = 3 if keep else 1
    voxels = int(claim.columns or 0) * int(claim.rows or 0) * frames * (3 if _is_colour(head) else 1)
    check_voxel_cap(p, voxels, max_voxels)  # decoding holds the full colour frames
    return ImageHeader(
        path=p,
        format="dicom",
        shape=shape,
        channels=channels,
        voxels=shape[0] * shape[1] * frames * channels,
        spacing=(spacing[0], spacing[1], 1.0),
        dtype=claim.dtype,
        data_file=p,
        bytes_expected=claim.expected,
        bytes_present=claim.present,
        compression="none" if claim.native else claim.transfer_syntax,
    )


def _check_us(head: Any, path: Path) -> None:
    if not UltrasoundAdapter().detect(head):
        raise DataError(
            f"{path.name} is not an ultrasound image (SOP class {sop_class_of(head) or '(absent)'})",
            expected=f"one of the SOP classes {', '.join(f'{v} {k}' for k, v in US_SOP_CLASSES.items())}",
            path=path,
        )


def load_ultrasound(path: str | Path, *, max_voxels: int | None = None, **options: Any) -> MetaTensor:
    """Load a US image or cine loop, calibrated and cropped by its ultrasound region (module docstring).

    Args:
        path: the DICOM file.
        max_voxels: refuse an image of more values (decoded, colour counted) than this (None: no cap).
        **options: ``crop`` (default True: crop to the chosen region), ``colour`` (``"auto"`` by the rule above,
            ``"rgb"`` keeps colour, ``"luminance"`` always converts), ``region`` (0-based index of the usable region
            to use instead of the largest).

    Returns:
        float32 ``MetaTensor`` ``(C, X, Y, T)`` (X = column, Y = row, T = frame), affine ``diag(column mm, row mm,
        1, 1)`` with the crop box's corner as origin; meta keys in ``docs/modalities.md``.

    Raises:
        DataError: not a US file, a lying header, a region in unknown units or outside the image, frames of
            unequal size, a colour space the decoder cannot handle, undecodable pixels, more than ``max_voxels``.
        ConfigError: an unknown option or value, or a ``region`` that is not usable.
    """
    import pydicom

    p = Path(path)
    crop, colour_mode, wanted = _options(options)
    ultrasound_header(p, max_voxels=max_voxels)  # refuses a lying header or too many voxels before decoding
    ds = pydicom.dcmread(p)
    regions = ultrasound_regions(ds, p)
    region, choice = _choose(regions, wanted, p)
    pixels = decode_frames(ds, p, _PHOTOMETRIC)
    n, rows, columns = pixels.shape[:3]
    colour = pixels.ndim == 4
    flow = bool(region is not None and region.data_type == 2) or _flow_flag(ds)
    if colour and colour_mode == "auto":
        keep = flow or (region is None and _has_chroma(pixels))
    else:
        keep = colour and colour_mode == "rgb"
    box = region.box if (region is not None and crop) else (0, 0, columns - 1, rows - 1)
    pixels = pixels[:, box[1] : box[3] + 1, box[0] : box[2] + 1]
    if colour and not keep:
        data = np.tensordot(pixels.astype(np.float32), _LUMA, axes=([3], [0]))[None]  # (1, T, R, C)
    elif colour:
        data = np.moveaxis(pixels.astype(np.float32), 3, 0)
    else:
        data = pixels.astype(np.float32)[None]
    data = np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1)))  # (C, T, rows, cols) -> (C, X, Y, T)
    sx, sy = (region.column_mm, region.row_mm) if region is not None else (1.0, 1.0)
    affine = np.diag([sx, sy, 1.0, 1.0])
    affine[:2, 3] = (box[0] * sx, box[1] * sy)
    if region is None:
        logger.warning(
            "%s: no usable ultrasound region (2D tissue or colour flow calibrated in cm); spacing is NOT "
            "calibrated (1 mm per pixel assumed)",
            p.name,
        )
    times, time_source = frame_times(ds, n, p)
    meta = {
        "filename_or_obj": str(p),
        "source_format": "dicom",
        "modality_adapter": "ultrasound",
        "modality": str(ds.get("Modality", "") or "").upper(),
        "sop_class_uid": sop_class_of(ds),
        "sop_class": US_SOP_CLASSES.get(sop_class_of(ds), ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "number_of_frames": n,
        "source_frame_shape": [columns, rows],
        "frame_times_ms": times,
        "frame_time_source": time_source,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "") or "").upper(),
        "colour": ("rgb" if keep else "luminance") if colour else "grey",
        "colour_flow": flow,
        "spacing_calibrated": region is not None,
        "spacing_source": "SequenceOfUltrasoundRegions" if region is not None else "default",
        "geometry_source": "SequenceOfUltrasoundRegions" if region is not None else "default",
        "us_region": _region_meta(region),
        "us_regions": [_region_meta(r) for r in regions],
        "us_region_choice": choice,
        "crop_box": list(box),
        "cropped": box != (0, 0, columns - 1, rows - 1),
        "intensity_preset": UltrasoundAdapter.preset,
    }
    return to_metatensor(data, check_affine(affine, p.name), meta)


def _region_meta(region: USRegion | None) -> dict[str, Any] | None:
    if region is None:
        return None
    out = asdict(region)
    out["box"], out["stated_box"] = list(region.box), list(region.stated_box)
    return out


def restore_ultrasound_mask(mask: Any, meta: Mapping[str, Any]) -> np.ndarray:
    """Paste a mask made on a (cropped) ultrasound image back onto the full source frame, zero outside the box.

    Args:
        mask: labels ``(X', Y', T)``, ``(1, X', Y', T)`` or ``(X', Y')`` on the loaded image's grid.
        meta: the loaded image's meta (``crop_box``, ``source_frame_shape``).

    Returns:
        ``(X, Y, T)`` array of the mask's dtype on the source frame grid (X = column, Y = row).

    Raises:
        ModelInputError: the mask's shape differs from the crop box's.
    """
    arr = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    x0, y0, x1, y1 = (int(v) for v in meta["crop_box"])
    columns, rows = (int(v) for v in meta["source_frame_shape"])
    if arr.ndim != 3 or arr.shape[:2] != (x1 - x0 + 1, y1 - y0 + 1):
        raise ModelInputError(
            f"ultrasound mask has shape {arr.shape}",
            expected=f"(X, Y, T) with (X, Y) = {(x1 - x0 + 1, y1 - y0 + 1)}, the crop box {[x0, y0, x1, y1]}",
        )
    full = np.zeros((columns, rows, arr.shape[2]), dtype=arr.dtype)
    full[x0 : x1 + 1, y0 : y1 + 1] = arr
    return full


class UltrasoundAdapter(ModalityAdapter):
    """The ultrasound adapter (US Image, US Multi-frame Image); see the module docstring."""

    name: ClassVar[str] = "ultrasound"
    preset: ClassVar[str] = "us"
    options: ClassVar[tuple[str, ...]] = _OPTIONS

    def detect(self, source: str | Path | Any) -> bool:
        if isinstance(source, str | Path):
            source = header_dataset(source)
            if source is None:
                return False
        sop = sop_class_of(source)
        if sop:
            return sop in US_SOP_CLASSES
        return str(source.get("Modality", "") or "").upper() == "US"

    def load(self, path: str | Path, *, max_voxels: int | None = None, **options: Any) -> MetaTensor:
        return load_ultrasound(path, max_voxels=max_voxels, **options)

    def header(self, path: str | Path, *, max_voxels: int | None = None) -> ImageHeader:
        return ultrasound_header(path, max_voxels=max_voxels)

    def restore_mask(self, mask: Any, meta: Mapping[str, Any]) -> np.ndarray:
        return restore_ultrasound_mask(mask, meta)


ULTRASOUND = register_adapter(UltrasoundAdapter())
