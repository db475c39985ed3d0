"""X-ray angiography (XA, Enhanced XA, XRF): cine runs as ``(1, X, Y, T)`` volumes, mask subtraction, pixel size.

A run is one (multi-)frame DICOM instance. :func:`load_xa` returns a float32 ``MetaTensor`` ``(C=1, X, Y, T)`` in
medseg's 2D convention: ``X`` is the column index, ``Y`` the row index (the pixel at row ``r``, column ``c`` of
frame ``t`` is ``image[0, c, r, t]``) and ``T`` the frame (a single-frame image has ``T = 1``). The affine is
``diag(column spacing, row spacing, 1, 1)`` in mm (a projection has no patient position; the third axis is time,
see the ``frame_times_ms`` meta).

Subtraction (``subtract=True``, the default for runs of two frames or more) follows the Mask Subtraction Sequence
(0028,6100): ``AVG_SUB`` subtracts the average of the 1-based Mask Frame Numbers, ``TID`` the frame
``f - TIDOffset``, ``REV_TID`` the frame ``(F - TIDOffset) - (f - F)`` (``F`` the first applicable frame), each over
its Applicable Frame Range (inclusive pairs; the standard's defaults when absent), after averaging Contrast Frame
Averaging live frames (AVG_SUB) and shifting the mask by Mask Sub-pixel Shift (0028,6114) or, in Enhanced XA, the
frame's Frame Pixel Shift Sequence item with the same Subtraction Item ID. Data stored as ``LIN`` (Pixel Intensity
Relationship (0028,1040)) is subtracted in the log domain, ``log(max(live, 1)) - log(max(mask, 1))``; ``LOG`` and
``DISP`` data as stored. The result is signed so that contrast-filled vessels are negative (a Pixel Intensity
Relationship Sign of -1 flips it). Frames no item covers are 0 and are left out of the derived images.

With no usable item (no sequence, or only ``NONE``), the mask is chosen automatically (:func:`auto_mask_frames`):
the frames before contrast arrives, found from the drop of the mean (log) intensity, and each live frame is
registered to it by phase correlation (:func:`register_shift`, sub-pixel); the shift used per frame is in the meta.
``derive`` picks what is returned: ``"series"`` (default, every frame), ``"minip"`` (the minimum over time of the
subtracted frames, the whole opacified tree) or ``"peak"`` (the frame with the most opacification, see
:func:`peak_frame`). Pixel size: :func:`xa_spacing`. The rules and meta keys are in ``docs/modalities.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
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
    "DERIVES",
    "XA_SOP_CLASSES",
    "FramePlan",
    "XAAdapter",
    "XAOptions",
    "XASpacing",
    "auto_mask_frames",
    "load_xa",
    "mask_plan",
    "peak_frame",
    "register_shift",
    "shift_image",
    "subtract_frames",
    "xa_spacing",
]

XA_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.12.1": "XA",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA",
    "1.2.840.10008.5.1.4.1.1.12.2": "XRF",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "Enhanced XRF",
}
DERIVES = ("series", "minip", "peak")
_REGISTRATION = ("auto", "on", "off")
_OPERATIONS = ("AVG_SUB", "TID", "REV_TID")
_REGISTRATION_SIZE = 512


@dataclass(frozen=True)
class XAOptions:
    """Options of :func:`load_xa`.

    Attributes:
        derive: ``"series"`` (every frame), ``"minip"`` (minimum over the subtracted frames) or ``"peak"`` (the
            frame of most opacification).
        subtract: subtract a mask (runs of two frames or more); False returns the stored frames.
        mask_frames: 1-based frames to average as the mask of every frame, overriding the file and the automatic
            choice (registered like an automatic mask).
        registration: ``"auto"`` registers only an automatically chosen (or ``mask_frames``) mask, ``"on"`` every
            subtraction (the registered shift replaces the file's), ``"off"`` never.
        upsample: phase correlation precision, ``1 / upsample`` pixel.
        max_mask_frames: the automatic mask averages at most this many frames just before contrast arrival.
        arrival_fraction: contrast has arrived at the first frame whose mean drop reaches this fraction of the
            largest drop.
        shift_order: spline order of the sub-pixel mask shift: 1 (bilinear, default, fast) or 3 (cubic, about 3x
            slower, smaller residual on fine texture).
    """

    derive: str = "series"
    subtract: bool = True
    mask_frames: tuple[int, ...] | None = None
    registration: str = "auto"
    upsample: int = 20
    max_mask_frames: int = 4
    arrival_fraction: float = 0.1
    shift_order: int = 1

    def __post_init__(self) -> None:
        if self.derive not in DERIVES:
            raise ConfigError(f"unknown XA derive {self.derive!r}", expected=f"one of {DERIVES}")
        if self.registration not in _REGISTRATION:
            raise ConfigError(f"unknown XA registration {self.registration!r}", expected=f"one of {_REGISTRATION}")
        if (
            self.upsample < 1
            or self.max_mask_frames < 1
            or not 0.0 < self.arrival_fraction < 1.0
            or self.shift_order not in (1, 3)
        ):
            raise ConfigError(
                f"XA options upsample={self.upsample}, max_mask_frames={self.max_mask_frames}, "
                f"arrival_fraction={self.arrival_fraction}, shift_order={self.shift_order}",
                expected="upsample >= 1, max_mask_frames >= 1, 0 < arrival_fraction < 1 and shift_order 1 or 3",
            )


@dataclass(frozen=True)
class FramePlan:
    """How one frame is subtracted (0-based frame indices).

    Attributes:
        live: frames averaged as the live image (Contrast Frame Averaging), the frame itself first.
        masks: frames averaged as the mask.
        shift: ``(row, column)`` displacement applied to the mask in pixels, positive toward higher row / column
            index (the mask's content at ``(r, c)`` moves to ``(r + row, c + column)``).
        item: index of the Mask Subtraction Sequence item used (None: automatic or given mask).
    """

    live: tuple[int, ...]
    masks: tuple[int, ...]
    shift: tuple[float, float] = (0.0, 0.0)
    item: int | None = None


@dataclass(frozen=True)
class XASpacing:
    """Pixel size of an XA image and what it refers to (:func:`xa_spacing`).

    Attributes:
        row_mm, column_mm: spacing between rows and between columns in mm.
        plane: ``"isocentre"`` (magnification corrected or calibrated), ``"detector"`` (Imager Pixel Spacing
            alone) or None (no spacing in the file; 1 mm).
        calibrated: whether the spacing refers to the object (isocentre) plane.
        source: the attributes it came from.
        magnification: the magnification factor divided out, None if none was.
    """

    row_mm: float
    column_mm: float
    plane: str | None
    calibrated: bool
    source: str
    magnification: float | None = None


def _bad(
    path: Path, what: str, expected: str, hint: str = "the mask description is corrupt; re-export the run"
) -> DataError:
    return DataError(f"{path.name}: {what}", expected=expected, hint=hint, path=path)


def _ints(value: Any) -> list[int]:
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, int | float | str) else list(value)
    return [int(v) for v in items]


def _first_item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def find_attribute(ds: Any, keyword: str) -> Any:
    """``keyword``'s value at the top level, else in the shared, else the first per-frame functional group (one
    sequence deep, as Enhanced objects nest it); None if absent."""
    if ds.get(keyword) not in (None, ""):
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(ds, groups)
        if group is None:
            continue
        for element in group:
            if element.VR == "SQ" and element.value and element.value[0].get(keyword) not in (None, ""):
                return element.value[0].get(keyword)
    return None


def _positive(value: Any, count: int) -> tuple[float, ...] | None:
    values = float_values(value)
    if values is None or len(values) != count or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return values


def xa_spacing(ds: Any) -> XASpacing:
    """The pixel size of an XA / XRF image.

    Order: Imager Pixel Spacing (0018,1164) divided by Estimated Radiographic Magnification Factor (0018,1114), else
    by SID / SOD (Distance Source To Detector (0018,1110) over Distance Source To Patient (0018,1111), or Distance
    Source To Isocenter (0018,9402) in Enhanced objects): isocentre plane, calibrated. Else Pixel Spacing
    (0028,0030) (a calibrated value): isocentre, calibrated. Else Imager Pixel Spacing alone: detector plane, not
    calibrated. Else 1 mm, no plane, not calibrated. Attributes are looked up at the top level and in the
    functional groups of Enhanced objects.
    """
    imager = _positive(find_attribute(ds, "ImagerPixelSpacing"), 2)
    if imager is not None:
        factor = _positive(find_attribute(ds, "EstimatedRadiographicMagnificationFactor"), 1)
        source = "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
        if factor is None:
            sid = _positive(find_attribute(ds, "DistanceSourceToDetector"), 1)
            sod = _positive(find_attribute(ds, "DistanceSourceToPatient"), 1) or _positive(
                find_attribute(ds, "DistanceSourceToIsocenter"), 1
            )
            if sid is not None and sod is not None and sid[0] >= sod[0]:
                factor, source = (sid[0] / sod[0],), "ImagerPixelSpacing / (SID / SOD)"
        if factor is not None:
            return XASpacing(imager[0] / factor[0], imager[1] / factor[0], "isocentre", True, source, factor[0])
    pixel = _positive(find_attribute(ds, "PixelSpacing"), 2)
    if pixel is not None:
        return XASpacing(pixel[0], pixel[1], "isocentre", True, "PixelSpacing")
    if imager is not None:
        return XASpacing(imager[0], imager[1], "detector", False, "ImagerPixelSpacing")
    return XASpacing(1.0, 1.0, None, False, "default")


# --------------------------------------------------------------------------------------------------- mask plans


def _ranges(item: Any, n: int, path: Path, index: int) -> list[tuple[int, int]] | None:
    values = _ints(item.get("ApplicableFrameRange"))
    if not values:
        return None
    pairs = list(zip(values[::2], values[1::2], strict=False))
    if len(values) % 2 or any(not 1 <= v <= n for v in values) or any(a > b for a, b in pairs):
        raise _bad(
            path,
            f"ApplicableFrameRange (0028,6102) {values} of mask item {index + 1}",
            f"pairs of 1-based frame numbers first <= last, within 1..{n} (NumberOfFrames)",
        )
    return [(values[k] - 1, values[k + 1] - 1) for k in range(0, len(values), 2)]


def _shift_of(item: Any) -> tuple[float, float]:
    shift = float_values(item.get("MaskSubPixelShift"))
    if shift is None or len(shift) != 2 or not all(math.isfinite(v) for v in shift):
        return 0.0, 0.0
    return float(shift[0]), -float(shift[1])  # DICOM: a positive column offset moves toward the left-hand column


def _frame_pixel_shifts(ds: Any, n: int) -> dict[tuple[int, int], tuple[float, float]]:
    """Enhanced XA per-frame shifts: ``(frame, SubtractionItemID) -> (row, column)`` in medseg's convention."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    for f, group in enumerate(list(groups)[:n]):
        for item in group.get("FramePixelShiftSequence") or []:
            if item.get("SubtractionItemID") is not None and "MaskSubPixelShift" in item:
                out[(f, int(item.SubtractionItemID))] = _shift_of(item)
    return out


def mask_plan(ds: Any, n: int, path: Path) -> tuple[list[FramePlan | None], list[str]]:
    """The subtraction of every frame from the Mask Subtraction Sequence (0028,6100).

    Returns:
        One :class:`FramePlan` per frame (None: no item covers it; the first item covering a frame wins) and the
        mask operations used. An empty operation list means no usable item.

    Raises:
        DataError: a Mask Frame Number (0028,6110) or Applicable Frame Range (0028,6102) outside 1..NumberOfFrames,
            an AVG_SUB item without mask frames, a REV_TID item without a range, or a TID Offset (0028,6120) that
            points outside the run.
    """
    plans: list[FramePlan | None] = [None] * n
    used: list[str] = []
    per_frame = _frame_pixel_shifts(ds, n)
    for index, item in enumerate(ds.get("MaskSubtractionSequence") or []):
        op = str(item.get("MaskOperation", "") or "").upper()
        if op not in _OPERATIONS:
            continue
        ranges = _ranges(item, n, path, index)
        item_id = item.get("SubtractionItemID")
        base_shift = _shift_of(item)
        entries: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        if op == "AVG_SUB":
            masks = _ints(item.get("MaskFrameNumbers"))
            bad = [m for m in masks if not 1 <= m <= n]
            if not masks or bad:
                raise _bad(
                    path,
                    f"MaskFrameNumbers (0028,6110) {masks or '(absent)'} of AVG_SUB item {index + 1}",
                    f"1-based frame numbers within 1..{n} (NumberOfFrames)",
                )
            average = max(1, int(item.get("ContrastFrameAveraging") or 1))
            for lo, hi in ranges or [(0, n - average)]:
                for f in range(lo, hi + 1):
                    live = tuple(range(f, min(f + average, n)))
                    entries.append((f, live, tuple(m - 1 for m in masks)))
        else:
            offset = int(item.get("TIDOffset") if item.get("TIDOffset") not in (None, "") else 1)
            if op == "REV_TID" and ranges is None:
                raise _bad(path, f"REV_TID item {index + 1} has no ApplicableFrameRange (0028,6102)", "a frame range")
            first = ranges[0][0] if ranges else 0
            frames = [f for lo, hi in ranges for f in range(lo, hi + 1)] if ranges else list(range(n))
            for f in frames:
                m = f - offset if op == "TID" else (first - offset) - (f - first)
                if not 0 <= m < n:
                    if ranges is None:
                        continue  # the standard's default range: only frames whose mask exists
                    raise _bad(
                        path,
                        f"TIDOffset (0028,6120) {offset} of {op} item {index + 1} gives mask frame {m + 1} for "
                        f"frame {f + 1}",
                        f"mask frames within 1..{n} (NumberOfFrames)",
                    )
                entries.append((f, (f,), (m,)))
        for f, live, masks_0 in entries:
            if plans[f] is None:
                shift = per_frame.get((f, int(item_id)), base_shift) if item_id is not None else base_shift
                plans[f] = FramePlan(live, masks_0, shift, index)
        used.append(op)
    return plans, used


def auto_mask_frames(means: Sequence[float], *, max_frames: int = 4, arrival_fraction: float = 0.1) -> list[int]:
    """Pre-contrast frames (0-based) from the mean intensity of each frame (in the subtraction domain).

    Rule: the baseline is the median of the first three frames' means; the drop of frame ``t`` is baseline minus its
    mean; contrast has arrived at the first frame after the first whose drop reaches ``arrival_fraction`` of the
    largest drop. The mask is the (at most ``max_frames``) frames before it, leaving out the frame just before it
    when two or more precede it (contrast is usually already flowing in there, below the threshold). With no drop at
    all (or the largest drop in the first frame) the first frame alone is the mask.
    """
    values = np.asarray(means, dtype=np.float64)
    n = len(values)
    if n < 2:
        return [0]
    base = float(np.median(values[: min(3, n)]))
    drop = base - values
    largest = float(drop.max())
    if not largest > 1e-9 * (abs(base) + 1.0) or int(np.argmax(drop)) == 0:
        return [0]
    later = np.nonzero(drop[1:] >= arrival_fraction * largest)[0]
    arrival = int(later[0]) + 1
    end = arrival - 1 if arrival >= 2 else arrival
    return list(range(max(0, end - max_frames), end))


def register_shift(reference: np.ndarray, moving: np.ndarray, upsample: int = 20) -> tuple[float, float]:
    """The ``(row, column)`` shift to apply to ``moving`` (:func:`shift_image`) so that it matches ``reference``.

    Cross-correlation in the Fourier domain (``skimage.registration.phase_cross_correlation`` without phase
    normalisation: whitening lets the contrast-filled vessels, absent from the mask, dominate) of the mean-free,
    Hann-windowed images, refined to ``1 / upsample`` pixel by the upsampled DFT.
    """
    return _Registrar(moving, upsample).shift_to(reference)


class _Registrar:
    """Cross-correlation against one moving image whose spectrum is computed once, on the central region of at
    most ``_REGISTRATION_SIZE`` pixels a side (the window suppresses the borders anyway)."""

    def __init__(self, moving: np.ndarray, upsample: int) -> None:
        from scipy import fft

        self.upsample = upsample
        rows, cols = moving.shape
        r0, c0 = max(0, (rows - _REGISTRATION_SIZE) // 2), max(0, (cols - _REGISTRATION_SIZE) // 2)
        self.box = (slice(r0, r0 + min(rows, _REGISTRATION_SIZE)), slice(c0, c0 + min(cols, _REGISTRATION_SIZE)))
        height, width = moving[self.box].shape
        self.window = np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)
        self.moving = fft.fft2(self._prepare(moving), workers=-1)

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        part = np.asarray(image[self.box], dtype=np.float32)
        return (part - part.mean()) * self.window

    def shift_to(self, reference: np.ndarray) -> tuple[float, float]:
        from scipy import fft
        from skimage.registration import phase_cross_correlation

        ref = fft.fft2(self._prepare(reference), workers=-1)
        shift, _, _ = phase_cross_correlation(
            ref, self.moving, upsample_factor=self.upsample, space="fourier", normalization=None
        )
        return float(shift[0]), float(shift[1])


def shift_image(image: np.ndarray, shift: Sequence[float], order: int = 1) -> np.ndarray:
    """``image`` ``(rows, columns)`` with its content moved by ``shift`` = (rows, columns): exact for whole pixels,
    else a spline of ``order`` (1 bilinear, 3 cubic); edge values are held."""
    if shift[0] == 0 and shift[1] == 0:
        return image
    from scipy import ndimage

    if order == 1:
        return _bilinear(image, float(shift[0]), float(shift[1]))
    whole = float(shift[0]).is_integer() and float(shift[1]).is_integer()
    return ndimage.shift(image, shift, order=0 if whole else 3, mode="nearest")


def _bilinear(image: np.ndarray, rows: float, columns: float) -> np.ndarray:
    """Bilinear shift with held edges (equal to ``ndimage.shift(order=1, mode="nearest")``, several times faster:
    a constant shift makes the interpolation separable into two gathers and blends)."""
    out = image
    for axis, shift in ((0, rows), (1, columns)):
        base = math.floor(-shift)
        weight = np.float32(-shift - base)
        size = image.shape[axis]
        index = np.arange(size) + base
        low = out.take(np.clip(index, 0, size - 1), axis=axis)
        if weight == 0:
            out = low
            continue
        high = out.take(np.clip(index + 1, 0, size - 1), axis=axis)
        out = low * (1 - weight) + high * weight
    return out


def subtract_frames(
    domain: np.ndarray, plans: Sequence[FramePlan | None], sign: float = 1.0, order: int = 1
) -> np.ndarray:
    """Apply ``plans`` to ``domain`` ``(T, rows, columns)`` (log or stored values): ``live - shifted mask`` per
    frame (shift spline ``order``), times ``sign``; frames without a plan are 0. Returns float32
    ``(T, rows, columns)``."""
    out = np.zeros(domain.shape, dtype=np.float32)
    masks: dict[tuple[int, ...], np.ndarray] = {}
    shifted: dict[tuple[tuple[int, ...], tuple[float, float]], np.ndarray] = {}
    for f, plan in enumerate(plans):
        if plan is None:
            continue
        if plan.masks not in masks:
            masks[plan.masks] = domain[list(plan.masks)].mean(axis=0, dtype=np.float32)
        key = (plan.masks, plan.shift)
        if key not in shifted:
            if len(shifted) > 4:  # registered shifts differ per frame: keep memory bounded
                shifted.clear()
            shifted[key] = shift_image(masks[plan.masks], plan.shift, order)
        live = domain[f] if len(plan.live) == 1 else domain[list(plan.live)].mean(axis=0, dtype=np.float32)
        np.subtract(live, shifted[key], out=out[f])
        if sign < 0:
            np.negative(out[f], out=out[f])
    return out


def peak_frame(subtracted: np.ndarray, frames: Sequence[int]) -> int:
    """The frame (0-based, among ``frames``) of most opacification: the lowest sum of the negative values of the
    subtracted frame (vessels are negative)."""
    scores = [float(np.minimum(subtracted[f], 0.0).sum(dtype=np.float64)) for f in frames]
    return int(frames[int(np.argmin(scores))])


# --------------------------------------------------------------------------------------------------- loading


def _angles(ds: Any, keyword: str, n: int) -> tuple[float | None, list[float] | None]:
    first = float_values(find_attribute(ds, keyword))
    single = float(first[0]) if first and math.isfinite(first[0]) else None
    groups = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    per_frame: list[float] = []
    for group in groups[:n]:
        item = _first_item(group, "PositionerPositionSequence")
        value = float_values(item.get(keyword)) if item is not None else None
        if not value or not math.isfinite(value[0]):
            break
        per_frame.append(float(value[0]))
    return single, per_frame if len(per_frame) == n and n > 1 else None


def _check_xa(head: Any, path: Path) -> None:
    if not XAAdapter().detect(head):
        raise DataError(
            f"{path.name} is not an X-ray angiography image (SOP class {sop_class_of(head) or '(absent)'})",
            expected=f"one of the SOP classes {', '.join(f'{v} {k}' for k, v in XA_SOP_CLASSES.items())}",
            path=path,
        )


def xa_header(path: str | Path, *, max_voxels: int | None = None) -> ImageHeader:
    """The :class:`~medseg.io.checks.ImageHeader` of what :func:`load_xa` returns by default (every frame)."""
    p = Path(path)
    head, claim = read_dicom_header(p)
    _check_xa(head, p)
    frames = int(claim.frames or 1)
    shape = (int(claim.columns or 0), int(claim.rows or 0), frames)
    voxels = shape[0] * shape[1] * frames
    check_voxel_cap(p, voxels, max_voxels)
    spacing = xa_spacing(head)
    return ImageHeader(
        path=p,
        format="dicom",
        shape=shape,
        channels=1,
        voxels=voxels,
        spacing=(spacing.column_mm, spacing.row_mm, 1.0),
        dtype=claim.dtype,
        data_file=p,
        bytes_expected=claim.expected,
        bytes_present=claim.present,
        compression="none" if claim.native else claim.transfer_syntax,
    )


def _options(options: Mapping[str, Any]) -> XAOptions:
    check_options("XA", options, [f.name for f in fields(XAOptions)])
    opts = XAOptions(**options)
    if opts.mask_frames is not None:
        opts = replace(opts, mask_frames=tuple(int(m) for m in opts.mask_frames))
    return opts


def load_xa(path: str | Path, *, max_voxels: int | None = None, **options: Any) -> MetaTensor:
    """Load an XA / Enhanced XA / XRF image or run, subtracted and derived as the module docstring says.

    Args:
        path: the DICOM file.
        max_voxels: refuse a run of more values than this before decoding (None: no cap).
        **options: the fields of :class:`XAOptions` (``derive``, ``subtract``, ``mask_frames``, ``registration``,
            ``upsample``, ``max_mask_frames``, ``arrival_fraction``).

    Returns:
        float32 ``MetaTensor`` ``(1, X, Y, T)`` (X = column, Y = row, T = frame; ``T = 1`` for ``"minip"`` and
        ``"peak"``) with ``affine = diag(column mm, row mm, 1, 1)``; meta keys in ``docs/modalities.md``.

    Raises:
        DataError: not an XA/XRF file, a lying header, colour pixels, undecodable pixels, frames of unequal size,
            a mask frame or frame range outside the run, a bad FrameTimeVector, more than ``max_voxels`` values.
        ConfigError: an unknown option or option value, or ``mask_frames`` outside the run.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    p = Path(path)
    opts = _options(options)
    xa_header(p, max_voxels=max_voxels)  # refuses a lying header or too many voxels before decoding
    ds = pydicom.dcmread(p)
    raw = decode_frames(ds, p, ("MONOCHROME1", "MONOCHROME2"))
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        raw = apply_modality_lut(raw, ds)
    frames = np.asarray(raw, dtype=np.float32)
    n = frames.shape[0]
    relationship = str(ds.get("PixelIntensityRelationship", "") or "").upper()
    sign = -1.0 if ds.get("PixelIntensityRelationshipSign") == -1 else 1.0
    times, time_source = frame_times(ds, n, p)
    meta: dict[str, Any] = {
        "filename_or_obj": str(p),
        "source_format": "dicom",
        "modality_adapter": "xa",
        "modality": str(ds.get("Modality", "") or "").upper(),
        "sop_class_uid": sop_class_of(ds),
        "sop_class": XA_SOP_CLASSES.get(sop_class_of(ds), ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "number_of_frames": n,
        "source_frame_shape": [int(ds.Columns), int(ds.Rows)],
        "image_type": [str(v) for v in (ds.get("ImageType") or [])],
        "frame_times_ms": times,
        "frame_time_source": time_source,
        "pixel_intensity_relationship": relationship,
        "recommended_viewing_mode": str(ds.get("RecommendedViewingMode", "") or ""),
        "intensity_preset": XAAdapter.preset,
    }
    for key, keyword in (
        ("positioner_primary", "PositionerPrimaryAngle"),
        ("positioner_secondary", "PositionerSecondaryAngle"),
    ):
        meta[f"{key}_angle"], meta[f"{key}_angles"] = _angles(ds, keyword, n)
    spacing = xa_spacing(ds)
    meta.update(
        spacing_plane=spacing.plane,
        spacing_calibrated=spacing.calibrated,
        spacing_source=spacing.source,
        magnification=spacing.magnification,
        geometry_source=spacing.source,
    )
    if not spacing.calibrated:
        logger.warning(
            "%s: pixel size %s (%s) is not calibrated to the isocentre; distances are %s",
            p.name,
            (spacing.row_mm, spacing.column_mm),
            spacing.source,
            "in detector pixels x Imager Pixel Spacing" if spacing.plane else "in pixels (1 mm assumed)",
        )
    derived = _subtract_and_derive(frames, ds, p, opts, relationship, sign, meta)
    affine = check_affine(np.diag([spacing.column_mm, spacing.row_mm, 1.0, 1.0]), p.name)
    meta["derive"] = opts.derive
    import torch  # its multi-threaded permute is faster than numpy's transpose for long runs

    data = torch.from_numpy(derived).permute(2, 1, 0).contiguous().numpy()[None]  # (T, rows, cols) -> (1, X, Y, T)
    return to_metatensor(data, affine, meta)


def _subtract_and_derive(
    frames: np.ndarray, ds: Any, path: Path, opts: XAOptions, relationship: str, sign: float, meta: dict[str, Any]
) -> np.ndarray:
    """Subtract (filling the mask meta) and derive; returns the derived frames ``(T', rows, columns)``."""
    n = frames.shape[0]
    plans: list[FramePlan | None] = [None] * n
    source, operations = "none", list[str]()
    if opts.subtract and n >= 2:
        domain = np.log(np.maximum(frames, 1.0, out=frames), out=frames) if relationship == "LIN" else frames
        if opts.mask_frames is not None:
            bad = [m for m in opts.mask_frames if not 1 <= m <= n]
            if bad or not opts.mask_frames:
                raise ConfigError(
                    f"mask_frames {list(opts.mask_frames)} for {path.name}", expected=f"frame numbers in 1..{n}"
                )
            masks, source = tuple(m - 1 for m in opts.mask_frames), "option"
        else:
            plans, operations = mask_plan(ds, n, path)
            source = "tags" if operations else "auto"
            masks = (
                ()
                if operations
                else tuple(
                    auto_mask_frames(
                        domain.mean(axis=(1, 2), dtype=np.float64),
                        max_frames=opts.max_mask_frames,
                        arrival_fraction=opts.arrival_fraction,
                    )
                )
            )
        if source != "tags":
            plans = [FramePlan((f,), masks) for f in range(n)]
            operations = ["AVG_SUB"]
        register = opts.registration == "on" or (opts.registration == "auto" and source != "tags")
        if register:
            plans = _registered(domain, plans, opts.upsample)
        data = subtract_frames(domain, plans, sign, opts.shift_order)
        meta["subtraction_domain"] = "log" if relationship == "LIN" else "stored"
        meta["registration"] = "phase_correlation" if register else ("tags" if source == "tags" else "none")
    else:
        data = frames
        meta["subtraction_domain"] = None
        meta["registration"] = "none"
    done = [f for f, plan in enumerate(plans) if plan is not None]
    meta.update(
        subtracted=bool(done),
        mask_source=source if done else "none",
        mask_operations=sorted(set(operations)) if done else [],
        mask_frames=sorted({m + 1 for f in done for m in plans[f].masks}),  # type: ignore[union-attr]
        mask_frames_per_frame=[[m + 1 for m in plan.masks] if plan else [] for plan in plans],
        mask_shifts=[list(plan.shift) if plan else [0.0, 0.0] for plan in plans],
        subtracted_frames=[f + 1 for f in done],
    )
    use = done or list(range(n))
    peak = peak_frame(data, use) if done else int(np.argmin(data.mean(axis=(1, 2))))
    meta["peak_frame_number"] = peak + 1
    if opts.derive == "series":
        meta["frames_in_output"] = list(range(1, n + 1))
        return data
    if opts.derive == "peak":
        meta["frames_in_output"] = [peak + 1]
        return data[peak : peak + 1]
    meta["frames_in_output"] = []
    return data[use].min(axis=0, keepdims=True)


def _registered(domain: np.ndarray, plans: list[FramePlan | None], upsample: int) -> list[FramePlan | None]:
    out: list[FramePlan | None] = list(plans)
    registrars: dict[tuple[int, ...], _Registrar] = {}
    for f, plan in enumerate(plans):
        if plan is None:
            continue
        if plan.masks not in registrars:
            registrars[plan.masks] = _Registrar(domain[list(plan.masks)].mean(axis=0, dtype=np.float32), upsample)
        live = domain[f] if len(plan.live) == 1 else domain[list(plan.live)].mean(axis=0, dtype=np.float32)
        out[f] = replace(plan, shift=registrars[plan.masks].shift_to(live))
    return out


# --------------------------------------------------------------------------------------------------- adapter


class XAAdapter(ModalityAdapter):
    """The X-ray angiography adapter (XA, Enhanced XA, XRF, single and multi-frame); see the module docstring."""

    name: ClassVar[str] = "xa"
    preset: ClassVar[str] = "zscore"
    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(XAOptions))

    def detect(self, source: str | Path | Any) -> bool:
        if isinstance(source, str | Path):
            source = header_dataset(source)
            if source is None:
                return False
        sop = sop_class_of(source)
        if sop:
            return sop in XA_SOP_CLASSES
        return str(source.get("Modality", "") or "").upper() in ("XA", "RF")

    def load(self, path: str | Path, *, max_voxels: int | None = None, **options: Any) -> MetaTensor:
        return load_xa(path, max_voxels=max_voxels, **options)

    def header(self, path: str | Path, *, max_voxels: int | None = None) -> ImageHeader:
        return xa_header(path, max_voxels=max_voxels)

    def restore_mask(self, mask: Any, meta: Mapping[str, Any]) -> np.ndarray:
        """The mask on the source frame grid: XA images are not cropped, so this checks the shape and returns
        ``(X, Y, T')`` (``T'`` the frames of the loaded image, ``meta["frames_in_output"]``; one for minip)."""
        arr = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 2:
            arr = arr[..., None]
        columns, rows = (int(v) for v in meta["source_frame_shape"])
        frames = max(1, len(meta.get("frames_in_output") or []))
        if arr.shape != (columns, rows, frames):
            raise ModelInputError(
                f"XA mask has shape {arr.shape}",
                expected=f"(X, Y, T) = {(columns, rows, frames)}, the loaded image's grid",
            )
        return arr


XA = register_adapter(XAAdapter())
