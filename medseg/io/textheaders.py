"""NRRD and MetaImage headers: parsed and checked here, before SimpleITK decodes a single pixel.

Both formats start with a text header that names the sizes, sample type, encoding and geometry, and *where the
pixels are*: after the header in the same file, or in other files (NRRD ``data file:``, MetaImage
``ElementDataFile``). These readers accept only what they can vouch for:

* Pixels in the file itself. A detached data file is read only with ``allow_external_data=True``, and only one
  regular file inside the header's folder; file lists (``LIST``) and numbered patterns (``%d``) are refused always.
* Sizes that match the bytes: raw data must be exactly ``voxels x components x itemsize`` bytes; compressed data
  (gzip/zlib, bzip2) is decompressed without being kept, one byte past the claim at most, and must give exactly the
  claimed size; text (NRRD ``ascii``/``hex``) must hold exactly one value per voxel.
* 2 or 3 spatial axes of positive length, plus at most one component axis (vector/colour images); finite,
  positive spacing; finite origin; finite, non-singular direction vectors. MetaImage ASCII element data is refused.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError
from medseg.io.checks import (
    ImageHeader,
    check_direction,
    check_origin,
    check_shape,
    check_spacing,
    check_voxel_cap,
    decompressed_size,
    external_data_error,
    local_data_file,
    regular_file,
    size_error,
)

logger = logging.getLogger(__name__)

__all__ = ["metaimage_header", "nrrd_header"]

_MAX_HEADER = 1 << 20  # a text header longer than 1 MiB is refused rather than searched
_NRRD_TYPES = {
    "int8": ("signed char", "int8", "int8_t"),
    "uint8": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "int16": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "uint16": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "int32": ("int", "signed int", "int32", "int32_t"),
    "uint32": ("uint", "unsigned int", "uint32", "uint32_t"),
    "int64": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "uint64": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "float32": ("float",),
    "float64": ("double",),
}
_NRRD_TYPE = {alias: dtype for dtype, aliases in _NRRD_TYPES.items() for alias in aliases}
_NRRD_ENCODING = {
    "raw": "raw",
    "gz": "gzip",
    "gzip": "gzip",
    "bz2": "bzip2",
    "bzip2": "bzip2",
    "txt": "text",
    "text": "text",
    "ascii": "text",
    "hex": "hex",
}
_DOMAIN_KINDS = {"domain", "space", "time", "???", "none", ""}
_VECTOR = re.compile(r"\(([^)]*)\)|none", re.IGNORECASE)
_MET_TYPES = {
    "MET_CHAR": "int8",
    "MET_UCHAR": "uint8",
    "MET_SHORT": "int16",
    "MET_USHORT": "uint16",
    "MET_INT": "int32",
    "MET_UINT": "uint32",
    "MET_LONG": "int32",
    "MET_ULONG": "uint32",
    "MET_LONG_LONG": "int64",
    "MET_ULONG_LONG": "uint64",
    "MET_FLOAT": "float32",
    "MET_DOUBLE": "float64",
}


def _refuse(path: Path, what: str, expected: str, hint: str | None = None) -> DataError:
    return DataError(
        f"{path.name}: {what}", expected=expected, hint=hint or "the header is corrupt; re-export the image", path=path
    )


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_MAX_HEADER)


def _ints(path: Path, text: str, field: str) -> list[int]:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        raise _refuse(path, f"{field} {text[:80]!r} is not a list of integers", f"integers in {field}") from None


def _floats(text: str) -> list[float]:
    out = []
    for token in text.replace(",", " ").split():
        try:
            out.append(float(token))
        except ValueError:
            out.append(math.nan)
    return out


@dataclass(frozen=True)
class _Pixels:
    """Where a header's pixels are and how they are stored."""

    file: Path
    offset: int  # bytes before the (possibly compressed) data in ``file``; -1: the data ends the file
    encoding: str  # raw | gzip | zlib | bzip2 | text | hex
    expected: int  # decompressed bytes (raw, gzip, bzip2) or values (text)
    skip: int = 0  # decompressed bytes skipped before the data (NRRD byte skip with compression)
    limit: int | None = None  # compressed bytes to read at most


def _check_pixels(path: Path, px: _Pixels) -> int | None:
    """Compare the bytes present with the claim; returns the raw byte count when it is knowable."""
    size = regular_file(px.file)
    start = max(px.offset, 0)
    available = size - start
    if px.encoding == "raw":
        if px.offset == -1:
            if available < px.expected:
                raise size_error(path, "the data file", px.expected, available)
            return px.expected
        if available != px.expected:
            raise size_error(
                path, "the file" if px.file == path else f"data file {px.file.name}", px.expected, available
            )
        return available
    if px.limit is not None and px.limit > available:
        raise size_error(path, f"the file (CompressedDataSize {px.limit})", px.limit, available)
    with open(px.file, "rb") as fh:
        fh.seek(start)
        if px.encoding in ("gzip", "zlib", "bzip2"):
            wanted = px.expected + px.skip
            found = decompressed_size(path, fh, px.encoding, wanted, px.limit)
            if found != wanted:
                shown: int | str = f"more than {wanted}" if found > wanted else found
                raise size_error(path, f"the decompressed {px.encoding} stream", wanted, shown)
            return None
        text = fh.read().decode("latin-1")
    if px.encoding == "hex":
        digits = re.sub(r"\s+", "", text)
        if len(digits) != 2 * px.expected or re.search(r"[^0-9A-Fa-f]", digits):
            raise size_error(path, "the hex data", px.expected, len(digits) // 2)
        return px.expected
    values = text.split()
    if len(values) != px.expected:
        raise _refuse(path, f"holds {len(values)} text values", f"{px.expected} values, one per voxel and component")
    return None


# --------------------------------------------------------------------------------------------------- NRRD


def _nrrd_fields(path: Path, head: bytes) -> tuple[dict[str, str], int | None, list[str]]:
    """Header fields (lower-case names), the offset just after the blank line (None if none) and trailing lines."""
    if not re.match(rb"NRRD000[1-9]\r?\n", head):
        raise _refuse(path, "does not start with a NRRD magic line", "NRRD0001 to NRRD0009")
    end = None
    for sep in (b"\r\n\r\n", b"\n\n"):
        found = head.find(sep)
        if found >= 0 and (end is None or found + len(sep) < end):
            end = found + len(sep)
    text = head[: end if end is not None else len(head)].decode("latin-1")
    lines = text.splitlines()[1:]
    fields: dict[str, str] = {}
    rest: list[str] = []
    for k, line in enumerate(lines):
        if not line.strip():
            break
        if line.startswith("#") or ":=" in line:
            continue
        if ": " not in line and not line.rstrip().endswith(":"):
            if "data file" in fields or "datafile" in fields:  # LIST data file names follow the fields
                rest = [ln for ln in lines[k:] if ln.strip()]
                break
            raise _refuse(path, f"header line {line[:60]!r} is not 'field: value'", "NRRD header fields")
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if end is None and "data file" not in fields and "datafile" not in fields and len(head) >= _MAX_HEADER:
        raise _refuse(path, f"has no end of header in its first {_MAX_HEADER} bytes", "a blank line ending the header")
    return fields, end, rest


def _nrrd_axes(path: Path, fields: dict[str, str], sizes: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Indices of the spatial axes and their spacing (mm), checking directions, spacings and the origin."""
    ndim = len(sizes)
    kinds = fields.get("kinds", "").split()
    if "space directions" in fields:
        entries = [m.group(1) for m in _VECTOR.finditer(fields["space directions"])]
        if len(entries) != ndim:
            raise _refuse(path, f"space directions has {len(entries)} entries", f"{ndim}, one per axis")
        spatial = [k for k, e in enumerate(entries) if e is not None]
        vectors = [_floats(entries[k]) for k in spatial]
        space_dim = len(vectors[0]) if vectors else 0
        if any(len(v) != space_dim for v in vectors) or space_dim != len(spatial):
            raise _refuse(
                path,
                f"space directions {fields['space directions'][:120]!r} do not form a square matrix",
                "one direction vector per spatial axis, each with one value per world axis",
            )
        matrix = check_direction(path, np.asarray(vectors, dtype=np.float64).T, "space directions")
        spacing = [float(v) for v in np.linalg.norm(matrix, axis=0)]
    else:
        spatial = [k for k in range(ndim) if k >= len(kinds) or kinds[k].lower() in _DOMAIN_KINDS]
        spacing = [1.0] * len(spatial)
        if "spacings" in fields:
            values = _floats(fields["spacings"])
            if len(values) != ndim:
                raise _refuse(path, f"spacings has {len(values)} values", f"{ndim}, one per axis")
            spacing = list(check_spacing(path, [values[k] for k in spatial], "spacings"))
    if "spacings" in fields and "space directions" in fields:
        check_spacing(path, [v for k, v in enumerate(_floats(fields["spacings"])) if k in spatial], "spacings")
    if "space origin" in fields:
        origin = _VECTOR.findall(fields["space origin"])
        values = _floats(origin[0]) if origin else []
        if not values:
            raise _refuse(path, f"space origin {fields['space origin'][:80]!r}", "a vector like (x,y,z)")
        check_origin(path, values, "space origin")
    if "measurement frame" in fields:
        frame = [_floats(v) for v in _VECTOR.findall(fields["measurement frame"]) if v]
        if frame and not all(math.isfinite(x) for row in frame for x in row):
            raise _refuse(path, "measurement frame is not finite", "finite values")
    return spatial, spacing


def _nrrd_data_file(path: Path, fields: dict[str, str], rest: list[str], allow_external_data: bool) -> Path | None:
    name = fields.get("data file", fields.get("datafile"))
    if name is None:
        return None
    if not allow_external_data:
        raise external_data_error(path, name)
    if name.split()[0].upper() == "LIST" or "%" in name or len(name.split()) > 1 or rest:
        raise _refuse(
            path,
            f"data file {name[:80]!r} names several files",
            "a single detached data file",
            "multi-file NRRD data (LIST or a numbered pattern) is not read; combine the slices into one file",
        )
    return local_data_file(path, name, allow_external_data)


def nrrd_header(path: Path, *, allow_external_data: bool = False, max_voxels: int | None = None) -> ImageHeader:
    """Read and check a NRRD header (``.nrrd`` or detached ``.nhdr``) and the length of its pixel data.

    Raises:
        DataError: a rule of the module docstring is broken, or the header claims more than ``max_voxels`` voxels.
    """
    regular_file(path)
    fields, end, rest = _nrrd_fields(path, _head(path))
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise _refuse(path, f"the NRRD header has no {required!r} field", "type, dimension, sizes and encoding")
    dtype = _NRRD_TYPE.get(fields["type"].lower())
    if dtype is None:
        raise _refuse(path, f"type {fields['type'][:40]!r} is not supported", "an integer, float or double type")
    encoding = _NRRD_ENCODING.get(fields["encoding"].lower())
    if encoding is None:
        raise _refuse(
            path, f"encoding {fields['encoding'][:40]!r} is not supported", f"one of {sorted(_NRRD_ENCODING)}"
        )
    dims = _ints(path, fields["dimension"], "dimension")
    if len(dims) != 1 or not 1 <= dims[0] <= 16:
        raise _refuse(path, f"dimension {fields['dimension'][:20]!r}", "an integer from 1 to 16")
    sizes = check_shape(path, _ints(path, fields["sizes"], "sizes"), "sizes")
    if len(sizes) != dims[0]:
        raise _refuse(path, f"sizes {list(sizes)} has {len(sizes)} entries", f"{dims[0]} (the dimension)")
    spatial, spacing = _nrrd_axes(path, fields, sizes)
    components = [k for k in range(len(sizes)) if k not in spatial]
    if len(spatial) not in (2, 3) or len(components) > 1:
        raise _refuse(
            path,
            f"has {len(spatial)} spatial and {len(components)} other axes (sizes {list(sizes)})",
            "a 2D or 3D image, optionally with one component (vector or colour) axis",
        )
    itemsize = np.dtype(dtype).itemsize
    if (
        itemsize > 1
        and encoding in ("raw", "gzip", "bzip2")
        and fields.get("endian", "").lower() not in ("little", "big")
    ):
        raise _refuse(path, f"endian {fields.get('endian', '(missing)')!r}", "endian: little or big")
    byte_skip = _ints(path, fields.get("byte skip", fields.get("byteskip", "0")), "byte skip")
    line_skip = _ints(path, fields.get("line skip", fields.get("lineskip", "0")), "line skip")
    if (
        len(byte_skip) != 1
        or byte_skip[0] < (-1 if encoding == "raw" else 0)
        or len(line_skip) != 1
        or line_skip[0] < 0
    ):
        raise _refuse(
            path, f"byte skip {byte_skip} / line skip {line_skip}", "byte skip >= 0 (-1 for raw), line skip >= 0"
        )
    data_file = _nrrd_data_file(path, fields, rest, allow_external_data)
    if data_file is None and end is None:
        raise _refuse(path, "the header has no blank line before the data", "a blank line ending the header")
    voxels = math.prod(sizes)
    check_voxel_cap(path, voxels, max_voxels)
    expected = voxels * itemsize
    file = data_file or path
    offset = 0 if data_file is not None else int(end or 0)
    if line_skip[0]:
        with open(file, "rb") as fh:
            fh.seek(offset)
            for _ in range(line_skip[0]):
                if not fh.readline():
                    break
            offset = fh.tell()
    if encoding == "raw":  # byte skip counts file bytes for raw data, decompressed bytes for gzip/bzip2
        offset = -1 if byte_skip[0] == -1 else offset + byte_skip[0]
    skip = byte_skip[0] if encoding in ("gzip", "bzip2") else 0
    present = _check_pixels(path, _Pixels(file, offset, encoding, voxels if encoding == "text" else expected, skip))
    shape = tuple(sizes[k] for k in spatial) + (1,) * (3 - len(spatial))
    channels = sizes[components[0]] if components else 1
    return ImageHeader(
        path=path,
        format="nrrd",
        shape=shape,  # type: ignore[arg-type]
        channels=channels,
        voxels=voxels,
        spacing=(*spacing, *([1.0] * (3 - len(spacing)))),  # type: ignore[arg-type]
        dtype=dtype,
        external_data=data_file is not None,
        data_file=file,
        bytes_expected=expected,
        bytes_present=present if encoding in ("raw", "hex") else None,
        compression=encoding if encoding in ("gzip", "bzip2") else "none",
    )


# --------------------------------------------------------------------------------------------------- MetaImage


def _meta_fields(path: Path, head: bytes) -> tuple[dict[str, str], int]:
    """Header fields (lower-case keys) and the offset just after the ``ElementDataFile`` line."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(head):
        newline = head.find(b"\n", offset)
        if newline < 0:
            break
        line = head[offset:newline].decode("latin-1").strip()
        offset = newline + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise _refuse(path, f"header line {line[:60]!r} is not 'Key = Value'", "MetaImage header lines")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return fields, offset
    raise _refuse(path, "the MetaImage header has no ElementDataFile line", "ElementDataFile = LOCAL (or a data file)")


def _meta_bool(path: Path, fields: dict[str, str], key: str, default: bool) -> bool:
    value = fields.get(key.lower())
    if value is None:
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise _refuse(path, f"{key} = {value[:20]!r}", f"{key} = True or False")


def metaimage_header(path: Path, *, allow_external_data: bool = False, max_voxels: int | None = None) -> ImageHeader:
    """Read and check a MetaImage header (``.mha`` or detached ``.mhd``) and the length of its pixel data.

    Raises:
        DataError: a rule of the module docstring is broken, or the header claims more than ``max_voxels`` voxels.
    """
    regular_file(path)
    fields, data_start = _meta_fields(path, _head(path))
    if fields.get("objecttype", "Image").lower() != "image":
        raise _refuse(path, f"ObjectType = {fields['objecttype'][:20]!r}", "ObjectType = Image")
    ndims = _ints(path, fields.get("ndims", ""), "NDims")
    if len(ndims) != 1 or ndims[0] not in (2, 3):
        raise _refuse(path, f"NDims = {fields.get('ndims', '(missing)')[:20]!r}", "NDims = 2 or 3")
    n = ndims[0]
    sizes = check_shape(path, _ints(path, fields.get("dimsize", ""), "DimSize"), "DimSize")
    if len(sizes) != n:
        raise _refuse(path, f"DimSize {list(sizes)} has {len(sizes)} entries", f"{n} (NDims)")
    spacing = [1.0] * n
    for key in ("elementspacing", "elementsize"):
        if key in fields:
            values = _floats(fields[key])
            if len(values) != n:
                raise _refuse(path, f"{key} has {len(values)} values", f"{n} (NDims)")
            checked = list(check_spacing(path, values, "ElementSpacing" if key == "elementspacing" else "ElementSize"))
            spacing = checked if key == "elementspacing" else spacing
    for key in ("offset", "origin", "position", "centerofrotation"):
        if key in fields:
            values = _floats(fields[key])
            if len(values) != n:
                raise _refuse(path, f"{key} has {len(values)} values", f"{n} (NDims)")
            check_origin(path, values, key)
    for key in ("transformmatrix", "rotation", "orientation"):
        if key in fields:
            values = _floats(fields[key])
            if len(values) != n * n:
                raise _refuse(path, f"{key} has {len(values)} values", f"{n * n} (NDims x NDims)")
            check_direction(path, np.asarray(values).reshape(n, n), "TransformMatrix")
    dtype = _MET_TYPES.get(fields.get("elementtype", "").upper().removesuffix("_ARRAY"))
    if dtype is None:
        raise _refuse(
            path, f"ElementType = {fields.get('elementtype', '(missing)')[:30]!r}", "a MET_ integer or float type"
        )
    channels_list = _ints(path, fields.get("elementnumberofchannels", "1"), "ElementNumberOfChannels")
    if len(channels_list) != 1 or channels_list[0] < 1:
        raise _refuse(path, f"ElementNumberOfChannels {channels_list}", "a positive integer")
    channels = channels_list[0]
    if not _meta_bool(path, fields, "BinaryData", False):
        raise _refuse(
            path, "holds ASCII element data (BinaryData = False)", "BinaryData = True", "re-export the image as binary"
        )
    compressed = _meta_bool(path, fields, "CompressedData", False)
    limit = None
    if "compresseddatasize" in fields:
        sizes_c = _ints(path, fields["compresseddatasize"], "CompressedDataSize")
        if len(sizes_c) != 1 or sizes_c[0] < 0:
            raise _refuse(path, f"CompressedDataSize {sizes_c}", "a non-negative integer")
        limit = sizes_c[0] if compressed and sizes_c[0] > 0 else None
    header_size = _ints(path, fields.get("headersize", "0"), "HeaderSize")
    if len(header_size) != 1 or header_size[0] < -1:
        raise _refuse(path, f"HeaderSize {header_size}", "an integer >= -1")
    name = fields["elementdatafile"]
    external = name.upper() != "LOCAL"
    if external:
        if not allow_external_data:
            raise external_data_error(path, name)
        if name.split()[0].upper() == "LIST" or "%" in name or len(name.split()) > 1:
            raise _refuse(
                path,
                f"ElementDataFile = {name[:80]!r} names several files",
                "ElementDataFile = LOCAL or one data file",
                "multi-file MetaImage data (LIST or a numbered pattern) is not read; combine the slices into one file",
            )
        file, offset = local_data_file(path, name, allow_external_data), header_size[0]
        if compressed:
            offset = max(offset, 0)
    else:
        if header_size[0] != 0:
            raise _refuse(path, f"HeaderSize = {header_size[0]} with ElementDataFile = LOCAL", "no HeaderSize")
        file, offset = path, data_start
    voxels = math.prod(sizes) * channels
    check_voxel_cap(path, voxels, max_voxels)
    expected = voxels * np.dtype(dtype).itemsize
    present = _check_pixels(path, _Pixels(file, offset, "zlib" if compressed else "raw", expected, limit=limit))
    shape = (*sizes, *([1] * (3 - n)))
    return ImageHeader(
        path=path,
        format="metaimage",
        shape=shape,  # type: ignore[arg-type]
        channels=channels,
        voxels=voxels,
        spacing=(*spacing, *([1.0] * (3 - n))),  # type: ignore[arg-type]
        dtype=dtype,
        external_data=external,
        data_file=file,
        bytes_expected=expected,
        bytes_present=present,
        compression="zlib" if compressed else "none",
    )
