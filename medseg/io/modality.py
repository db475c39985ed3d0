"""Modality adapters: one small interface per modality that :func:`medseg.io.load_image` dispatches to.

A :class:`ModalityAdapter` detects the files of its modality, loads them as a ``MetaTensor`` with their true geometry
and the modality's meta (frame times, mask frames, ultrasound regions ...), names the intensity preset of
:mod:`medseg.transforms.presets` that suits them, and puts a mask made on the loaded image back onto the source's
own frame grid (:meth:`ModalityAdapter.restore_mask`). Adapters register themselves with :func:`register_adapter`
when their module is imported (``medseg.io`` imports the built-in ones: :mod:`medseg.io.xa` and
:mod:`medseg.io.ultrasound`); :func:`find_adapter` returns the first registered adapter that detects a file, and
``load_image`` / ``read_header`` use it for single ``.dcm`` files and for DICOM folders whose series is one
multi-frame file. See ``docs/modalities.md``.

This module also holds the DICOM pieces both built-in adapters share: a header read that refuses lying pixel claims
(:func:`read_dicom_header`), frame decoding that names what went wrong (:func:`decode_frames`), the check that
every compressed frame has the size the header claims, and the frame time vector (:func:`frame_times`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, DataError
from medseg.core.registry import Registry
from medseg.io.checks import ImageHeader, regular_file
from medseg.io.dicom import PixelClaim, check_claim, float_values, pixel_claim, register_multiframe_adapter

logger = logging.getLogger(__name__)

__all__ = [
    "ModalityAdapter",
    "check_options",
    "decode_frames",
    "find_adapter",
    "frame_times",
    "get_adapter",
    "header_dataset",
    "list_adapters",
    "read_dicom_header",
    "register_adapter",
    "sop_class_of",
]

_ADAPTERS: Registry[ModalityAdapter] = Registry("modality adapter")
_JPEG_SYNTAXES_PREFIX = "1.2.840.10008.1.2.4."


class ModalityAdapter(ABC):
    """What medseg needs to know about one imaging modality.

    Attributes:
        name: registry name (``"xa"``, ``"ultrasound"``).
        preset: the intensity preset of :mod:`medseg.transforms.presets` that suits the loaded images.
        options: the keyword options :meth:`load` accepts.
    """

    name: ClassVar[str]
    preset: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def detect(self, source: str | Path | Any) -> bool:
        """Whether ``source`` (a file path or a pydicom ``Dataset``, header only is enough) is of this modality."""

    @abstractmethod
    def load(self, path: str | Path, *, max_voxels: int | None = None, **options: Any) -> MetaTensor:
        """Load ``path`` as a float32 ``MetaTensor`` ``(C, X, Y, T)`` with its geometry and modality meta."""

    @abstractmethod
    def header(self, path: str | Path, *, max_voxels: int | None = None) -> ImageHeader:
        """What :meth:`load` (with default options) will return, read from the header only."""

    @abstractmethod
    def restore_mask(self, mask: Any, meta: Mapping[str, Any]) -> np.ndarray:
        """Put a mask made on the loaded image back onto the source's frame grid ``(X, Y, T)``."""


def register_adapter(adapter: ModalityAdapter) -> ModalityAdapter:
    """Register ``adapter`` under its ``name`` (a duplicate name raises ``ConfigError``); returns it.

    The adapter is also offered DICOM folders whose series is one multi-frame file
    (:func:`medseg.io.dicom.register_multiframe_adapter`).
    """
    _ADAPTERS.add(adapter.name, adapter)
    register_multiframe_adapter(adapter)
    return adapter


def get_adapter(name: str) -> ModalityAdapter:
    """The adapter registered as ``name``; an unknown name raises ``ConfigError`` with a suggestion."""
    return _ADAPTERS.get(name)


def list_adapters() -> list[str]:
    """Names of the registered adapters, sorted."""
    return _ADAPTERS.names()


def find_adapter(source: str | Path | Any) -> ModalityAdapter | None:
    """The first registered adapter that detects ``source`` (a file path or a pydicom ``Dataset``), else None.

    A path that is not a readable DICOM file gives None (its own reader reports the problem).
    """
    dataset = header_dataset(source) if isinstance(source, str | Path) else source
    if dataset is None:
        return None
    for adapter in _ADAPTERS.values():
        if adapter.detect(dataset):
            return adapter
    return None


def header_dataset(path: str | Path) -> Any:
    """The pydicom header (no pixels) of ``path``; None if it is not a readable DICOM file."""
    p = Path(path)
    if not p.is_file():
        return None
    import pydicom

    try:
        return pydicom.dcmread(p, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM, or broken: the regular reader names the problem
        return None


def check_options(adapter: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Refuse keyword options an adapter does not know.

    Raises:
        ConfigError: naming the unknown options and the known ones.
    """
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown {adapter} option(s) {unknown}",
            expected=f"options among {sorted(allowed)}",
            hint="check the spelling; see docs/modalities.md",
        )


def sop_class_of(dataset: Any) -> str:
    """The dataset's SOPClassUID (or the file meta's MediaStorageSOPClassUID), "" if neither is present."""
    value = dataset.get("SOPClassUID") or getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", "")
    return str(value or "")


def read_dicom_header(path: Path) -> tuple[Any, PixelClaim]:
    """Read one DICOM file's header (no pixels) and refuse a header whose pixel claim lies.

    Unlike :func:`medseg.io.raster.dicom_file_claim` this accepts multi-frame files.

    Raises:
        DataError: not a regular file, not DICOM, no pixel data, or sizes that do not match the bytes present
            (:func:`medseg.io.dicom.check_claim`).
    """
    import pydicom

    size = regular_file(path, "an existing DICOM file")
    try:
        with open(path, "rb") as fh:
            head = pydicom.dcmread(fh, stop_before_pixels=True)
            claim = pixel_claim(fh, head, size)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error ... for broken files
        detail = str(exc).strip().splitlines()
        raise DataError(
            f"cannot read {path.name} as DICOM ({type(exc).__name__}: {detail[-1] if detail else ''})",
            expected="a valid DICOM file",
            hint="the file may be truncated or corrupt; re-export it",
            path=path,
        ) from exc
    if claim.element is None:
        raise DataError(f"{path.name} holds no pixel data", expected="a DICOM image", path=path)
    check_claim(claim, path, head)
    return head, claim


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """``(columns, rows)`` from a JPEG (SOF marker) or JPEG 2000 (SIZ marker) codestream, None if not found."""
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 28:  # J2K: SOC, then SIZ with Xsiz, Ysiz, XOsiz, YOsiz
        xsiz, ysiz, xo, yo = (int.from_bytes(frame[k : k + 4], "big") for k in (8, 12, 16, 20))
        return xsiz - xo, ysiz - yo
    if frame[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(frame):
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7:  # SOFn, JPEG-LS SOF55
            return int.from_bytes(frame[at + 7 : at + 9], "big"), int.from_bytes(frame[at + 5 : at + 7], "big")
        if marker == 0xDA:
            return None
        at += 2 + int.from_bytes(frame[at + 2 : at + 4], "big")
    return None


def check_frame_sizes(ds: Any, path: Path, frames: int) -> None:
    """Refuse compressed frames whose own size differs from Rows x Columns.

    Checked where the codestream says its size (JPEG family, JPEG-LS, JPEG 2000); native pixel data holds equal
    frames by construction.

    Raises:
        DataError: naming Rows (0028,0010) / Columns (0028,0011) and the frame that differs.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not syntax.startswith(_JPEG_SYNTAXES_PREFIX) or "PixelData" not in ds:
        return
    from pydicom.encaps import generate_frames

    expected = (int(ds.Columns), int(ds.Rows))
    try:
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            size = _jpeg_size(frame)
            if size is not None and size != expected:
                raise DataError(
                    f"{path.name}: frame {index + 1} of {frames} is {size[0]} x {size[1]} pixels (columns x rows)",
                    expected=f"every frame {expected[0]} x {expected[1]}, as Columns (0028,0011) and Rows "
                    "(0028,0010) say",
                    hint="frames of unequal size cannot form one cine run; re-export the run",
                    path=path,
                )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken offset table: leave it to the decoder to report
        logger.debug("%s: could not walk the encapsulated frames (%s)", path.name, exc)


def decode_frames(ds: Any, path: Path, supported: Sequence[str]) -> np.ndarray:
    """Decode every frame of ``ds`` as ``(T, rows, columns[, 3])`` (YBR converted to RGB, palette through its LUT).

    Args:
        ds: the full dataset (pixels included).
        path: the file, for messages.
        supported: the PhotometricInterpretation values the caller handles.

    Raises:
        DataError: a PhotometricInterpretation (0028,0004) outside ``supported``, frames of unequal size, or pixel
            data the decoder cannot decode (naming the TransferSyntaxUID (0002,0010)).
    """
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric not in supported:
        raise DataError(
            f"{path.name}: PhotometricInterpretation (0028,0004) is {photometric or '(absent)'}",
            expected=f"one of {', '.join(supported)}",
            hint="convert the file to RGB or MONOCHROME2 (e.g. gdcmconv) and retry",
            path=path,
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_frame_sizes(ds, path, frames)
    try:
        pixels = ds.pixel_array
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    except Exception as exc:  # pydicom raises RuntimeError/ValueError/NotImplementedError for undecodable data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(
            f"could not decode the pixel data of {path.name} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]})",
            expected=f"pixel data the decoder can handle (TransferSyntaxUID (0002,0010) "
            f"{getattr(syntax, 'name', syntax)}, PhotometricInterpretation {photometric})",
            hint="decompress the file (e.g. gdcmconv --raw) and retry",
            path=path,
        ) from exc
    pixels = np.asarray(pixels)
    colour = pixels.shape[-1] == 3 and (photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel", 1)) == 3)
    if frames == 1:
        pixels = pixels[None]
    expected = (frames, int(ds.Rows), int(ds.Columns))
    if pixels.shape[:3] != expected or pixels.ndim != (4 if colour else 3):
        raise DataError(
            f"{path.name}: decoded pixel data has shape {pixels.shape}",
            expected=f"{expected} (NumberOfFrames, Rows, Columns){' x 3 samples' if colour else ''}",
            hint="the header does not match the pixel data; re-export the file",
            path=path,
        )
    return pixels


def _datetime_ms(value: Any) -> float | None:
    from pydicom.valuerep import DT

    try:
        stamp = DT(str(value))
    except Exception:  # noqa: BLE001 - an unparsable DT gives no time
        return None
    return stamp.timestamp() * 1000.0


def _per_frame_times(ds: Any, n: int) -> tuple[list[float], str] | None:
    groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != n:
        return None
    for keyword in ("FrameReferenceDateTime", "FrameAcquisitionDateTime"):
        stamps = []
        for group in groups:
            content = (group.get("FrameContentSequence") or [None])[0]
            stamp = _datetime_ms(content.get(keyword)) if content is not None and keyword in content else None
            stamps.append(stamp)
        if all(s is not None for s in stamps):
            return [float(s - stamps[0]) for s in stamps], keyword  # type: ignore[operator]
    return None


def frame_times(ds: Any, n: int, path: Path) -> tuple[list[float] | None, str | None]:
    """Time of each of ``n`` frames in ms from the first, and the attribute it came from.

    Order: the attribute FrameIncrementPointer (0028,0009) names (FrameTime (0018,1063): ``k * FrameTime``;
    FrameTimeVector (0018,1065): the cumulative sum of the increments, whose first value is 0), then FrameTime, then
    FrameTimeVector, then per-frame FrameReferenceDateTime / FrameAcquisitionDateTime (Enhanced objects), then
    CineRate (0018,0040) and RecommendedDisplayFrameRate (0008,2144) in frames per second. ``(None, None)`` when
    none is usable (a single frame gives ``([0.0], None)``).

    Raises:
        DataError: a FrameTimeVector whose length differs from the frame count, or holding non-finite or negative
            increments.
    """
    if n <= 1:
        return [0.0], None
    pointer = ds.get("FrameIncrementPointer")
    pointed = [] if pointer is None else [int(pointer)] if isinstance(pointer, int) else [int(t) for t in pointer]
    order = [k for k, tag in (("FrameTimeVector", 0x00181065), ("FrameTime", 0x00181063)) if tag in pointed]
    order += [k for k in ("FrameTime", "FrameTimeVector") if k not in order]
    for keyword in order:
        if ds.get(keyword) in (None, ""):
            continue
        values = float_values(ds.get(keyword)) or ()
        if keyword == "FrameTime":
            step = values[0] if values else math.nan
            if math.isfinite(step) and step > 0:
                return [k * step for k in range(n)], keyword
            logger.warning("%s: ignoring FrameTime (0018,1063) %r (not a positive number)", path.name, step)
            continue
        if len(values) != n or not all(math.isfinite(v) and v >= 0 for v in values):
            raise DataError(
                f"{path.name}: FrameTimeVector (0018,1065) holds {len(values)} values {list(values)[:6]}...",
                expected=f"{n} finite, non-negative increments (one per frame, the first 0)",
                hint="the frame timing is corrupt; re-export the run",
                path=path,
            )
        return [float(v) for v in np.cumsum(np.asarray(values, dtype=np.float64))], keyword
    per_frame = _per_frame_times(ds, n)
    if per_frame is not None:
        return per_frame
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = float_values(ds.get(keyword)) if ds.get(keyword) not in (None, "") else None
        if rate and math.isfinite(rate[0]) and rate[0] > 0:
            return [k * 1000.0 / rate[0] for k in range(n)], keyword
    return None, None
