"""Checks every reader applies to what a file's header claims, before any pixel is decoded.

A header can lie: about where its pixels are (a detached data file, a device, a path outside the folder), about how
many there are (sizes larger than the bytes present, a compressed stream that is short or far too long), and about
where they sit in space (zero, negative or non-finite spacing, a singular direction matrix). The readers of
:mod:`medseg.io` describe a file by an :class:`ImageHeader` and refuse such lies with a
:class:`~medseg.core.errors.DataError` that names what was claimed and what was found. See ``docs/security.md``.
"""

from __future__ import annotations

import bz2
import logging
import math
import os
import stat
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from medseg.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "NONFINITE_MODES",
    "ImageHeader",
    "NonFinite",
    "VoxelLimitError",
    "check_direction",
    "check_nonfinite_mode",
    "check_origin",
    "check_shape",
    "check_spacing",
    "check_voxel_cap",
    "decompressed_size",
    "external_data_error",
    "local_data_file",
    "regular_file",
    "size_error",
]

#: What :func:`medseg.io.load_image` does with NaN/Inf voxel values: refuse the image, or replace them with 0.
NonFinite = Literal["error", "zero"]
NONFINITE_MODES: tuple[str, ...] = ("error", "zero")
_CHUNK = 1 << 20
_EXTERNAL_HINT = (
    "pixel data must be stored in the file itself; for a local detached .nhdr/.mhd/.hdr whose data file sits next "
    "to it, pass allow_external_data=True"
)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file claims about itself, read without decoding its pixels (:func:`medseg.io.read_header`).

    Attributes:
        path: the file or DICOM folder described.
        format: ``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom"`` or ``"raster"``.
        shape: spatial shape ``(X, Y, Z)`` as :func:`medseg.io.load_image` returns it (a 2D image has ``Z = 1``).
        channels: channels ``C`` (vector components, colour samples, the 4th NIfTI axis); a palette image counts 3.
        voxels: ``C * X * Y * Z``, the number of values the decoded image holds.
        spacing: voxel size in mm along ``(X, Y, Z)`` (1.0 where the file states none).
        dtype: the stored sample type as a numpy name (``"int16"``, ``"float32"``, ...).
        external_data: whether the header names pixel data outside the file itself.
        data_file: the file holding the pixel data (``path`` itself unless ``external_data``).
        bytes_expected: pixel bytes the header implies (decompressed), where knowable.
        bytes_present: pixel bytes the file holds (raw data), where knowable without decoding; None for compressed
            data, whose length is checked while it is decoded.
        compression: ``"none"`` or the stream's compression (``"gzip"``, ``"zlib"``, ``"bzip2"``, a DICOM transfer
            syntax name, ``"png"``...).
    """

    path: Path
    format: str
    shape: tuple[int, int, int]
    channels: int
    voxels: int
    spacing: tuple[float, float, float]
    dtype: str
    external_data: bool = False
    data_file: Path | None = None
    bytes_expected: int | None = None
    bytes_present: int | None = None
    compression: str = "none"


def _error(path: Path, what: str, expected: str, hint: str | None = None) -> DataError:
    return DataError(f"{path.name}: {what}", expected=expected, hint=hint, path=path)


def regular_file(path: Path, what: str = "an existing image file") -> int:
    """The size in bytes of ``path``, refusing anything but a regular file (devices, FIFOs, sockets, folders).

    Raises:
        DataError: ``path`` is missing or is not a regular file.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DataError(f"{path} not found ({exc.strerror})", expected=what, path=path) from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(
            f"{path.name} is not a regular file",
            expected=what,
            hint="devices, pipes and sockets are refused",
            path=path,
        )
    return int(info.st_size)


def check_shape(path: Path, sizes: Sequence[Any], what: str = "size") -> tuple[int, ...]:
    """The sizes as ints, refusing zero-length, negative or non-integer dimensions."""
    out = []
    for value in sizes:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number != int(number) or number < 1:
            raise _error(
                path,
                f"{what} {list(sizes)} has a zero-length, negative or non-integer dimension",
                "every dimension a positive integer",
                "the header is corrupt; re-export the image",
            )
        out.append(int(number))
    return tuple(out)


def _fmt(values: Sequence[float]) -> str:
    """Numbers for a message: ``[0.9, nan, 2]`` (short, without numpy's reprs)."""
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _as_floats(values: Sequence[Any]) -> list[float]:
    out = []
    for value in values:
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def check_spacing(path: Path, spacing: Sequence[Any], what: str = "spacing") -> tuple[float, ...]:
    """The spacing as floats, refusing zero, negative, NaN or infinite values."""
    values = _as_floats(spacing)
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise _error(
            path,
            f"{what} {_fmt(values)} is not finite and positive",
            "finite, positive voxel spacing (mm)",
            "the voxel size is unknown; fix the header rather than guess it",
        )
    return tuple(values)


def check_origin(path: Path, origin: Sequence[Any], what: str = "origin") -> tuple[float, ...]:
    """The origin as floats, refusing NaN or infinite values."""
    values = _as_floats(origin)
    if not all(math.isfinite(v) for v in values):
        raise _error(path, f"{what} {_fmt(values)} is not finite", "finite world coordinates (mm)")
    return tuple(values)


def check_direction(path: Path, matrix: Any, what: str = "direction") -> np.ndarray:
    """A square axis matrix (one column per array axis), refusing non-finite, zero-length or dependent columns.

    Args:
        path: the file, for the message.
        matrix: ``(N, N)`` numbers; columns are the world directions (possibly scaled by the spacing) of the axes.
        what: the header field, for the message.

    Returns:
        The matrix as float64.
    """
    try:
        arr = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.full((1, 1), np.nan)
    shown = "[" + ", ".join(_fmt(row) for row in np.atleast_2d(arr)) + "]"
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or not np.all(np.isfinite(arr)):
        raise _error(path, f"{what} {shown} is not a finite square matrix", "finite directions")
    norms = np.linalg.norm(arr, axis=0)
    if np.any(norms <= 0) or abs(np.linalg.det(arr / norms[None, :])) < 1e-6:
        raise _error(
            path,
            f"{what} {shown} is singular (a zero-length or repeated axis)",
            "linearly independent axis directions",
            "the orientation is unknown; fix the header rather than guess it",
        )
    return arr


class VoxelLimitError(DataError):
    """A header claims more voxels than the caller's ``max_voxels`` (checked before anything else is read).

    Attributes:
        voxels: the claimed number of values (voxels times channels).
        limit: the cap it exceeds.
    """

    def __init__(self, path: Path, voxels: int, limit: int) -> None:
        super().__init__(
            f"{path.name}: the header claims {voxels} voxels",
            expected=f"at most {limit} voxels",
            hint="crop or downsample the image, or raise the voxel limit",
            path=path,
        )
        self.voxels, self.limit = voxels, limit


def check_voxel_cap(path: Path, voxels: int, max_voxels: int | None) -> None:
    """Refuse an image whose header claims more than ``max_voxels`` values (None: no cap).

    Raises:
        VoxelLimitError: over the cap.
    """
    if max_voxels is not None and voxels > max_voxels:
        raise VoxelLimitError(path, voxels, max_voxels)


def check_nonfinite_mode(mode: str) -> None:
    """Refuse an unknown ``nonfinite`` option."""
    from medseg.core.errors import ConfigError

    if mode not in NONFINITE_MODES:
        raise ConfigError(f"nonfinite={mode!r}", expected=f"one of {', '.join(NONFINITE_MODES)}")


def size_error(path: Path, what: str, expected: int, found: int | str, hint: str | None = None) -> DataError:
    """The error for pixel data whose length differs from what the header implies."""
    if isinstance(found, int):
        found = max(found, 0)  # a data offset past the end of the file leaves nothing
    return DataError(
        f"{path.name}: {what} holds {found} bytes of pixel data",
        expected=f"{expected} bytes, as the header's sizes and sample type imply",
        hint=hint or "the file is truncated or its header lies about the image size; re-export it",
        path=path,
    )


def external_data_error(path: Path, target: str) -> DataError:
    """The error for a header that names pixel data outside the file while external data is not allowed."""
    return DataError(
        f"{path.name} keeps its pixel data outside the file ({target[:120]!r})",
        expected="an image whose pixels are stored in the file itself",
        hint=_EXTERNAL_HINT,
        path=path,
    )


def local_data_file(header_path: Path, name: str, allow_external_data: bool) -> Path:
    """Resolve a detached data file named by a header, allowing only one regular file in the header's folder.

    Args:
        header_path: the ``.nhdr`` / ``.mhd`` / ``.hdr`` file.
        name: the file name its header gives.
        allow_external_data: the caller's opt-in; without it every external reference is refused.

    Raises:
        DataError: external data not allowed, a list or pattern of files, or a target that is absolute, leaves the
            header's folder (``..``, symbolic links), is missing or is not a regular file.
    """
    if not allow_external_data:
        raise external_data_error(header_path, name)
    folder = header_path.resolve().parent
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        raise DataError(
            f"{header_path.name} names the data file {name[:120]!r}",
            expected="a data file name relative to the header's folder, without '..'",
            hint="keep the data file next to its header",
            path=header_path,
        )
    target = (folder / candidate).resolve()
    if folder not in target.parents:
        raise DataError(
            f"{header_path.name}: data file {name[:120]!r} resolves outside the header's folder",
            expected="a data file inside the header's folder",
            hint="copy the data file next to its header instead of linking it",
            path=header_path,
        )
    regular_file(target, "the data file the header names, as a regular file next to it")
    return target


def _decompressor(kind: str) -> Callable[[], Any]:
    if kind == "bzip2":
        return bz2.BZ2Decompressor
    # wbits 47: zlib or gzip, detected from the stream's first bytes (MetaImage and NRRD writers use either).
    return lambda: zlib.decompressobj(47)


def decompressed_size(path: Path, fh: IO[bytes], kind: str, expected: int, limit: int | None = None) -> int:
    """Decompress a stream without keeping it, counting at most ``expected + 1`` bytes.

    Args:
        path: the file, for the message.
        fh: binary file positioned at the compressed data.
        kind: ``"gzip"``/``"zlib"`` (either is detected) or ``"bzip2"``.
        expected: decompressed bytes the header implies; decoding stops one byte past it, so a stream that expands
            far beyond its claim (a decompression bomb) costs no more than the claim.
        limit: compressed bytes to read at most (None: to the end of the file).

    Returns:
        The decompressed byte count, capped at ``expected + 1``.

    Raises:
        DataError: the stream is corrupt.
    """
    make = _decompressor(kind)
    decoder = make()
    total = 0
    remaining = math.inf if limit is None else limit
    pending = b""
    while total <= expected:
        buffered = kind == "bzip2" and not decoder.needs_input and not decoder.eof
        if not pending and not buffered:
            if remaining <= 0:
                break
            pending = fh.read(int(min(_CHUNK, remaining)))
            remaining -= len(pending)
            if not pending:
                break
        try:
            out = decoder.decompress(pending, expected + 1 - total)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise DataError(
                f"{path.name}: the {kind} pixel stream is corrupt ({type(exc).__name__}: {exc})",
                expected=f"a valid {kind} stream",
                hint="the file is truncated or damaged; re-export it",
                path=path,
            ) from exc
        total += len(out)
        pending = b"" if kind == "bzip2" else decoder.unconsumed_tail
        if decoder.eof:
            rest = decoder.unused_data
            if rest[:2] == b"\x1f\x8b" and kind != "bzip2":  # concatenated gzip members
                decoder, pending = make(), rest
                continue
            break
    return total
