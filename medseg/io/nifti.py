"""NIfTI-1/NIfTI-2 reading (nibabel) behind a header check that refuses lies before pixels are decoded.

The header is parsed on its own first (:func:`nifti_header`): NIfTI magic, 1 to 7 dimensions of positive length
(2D, 3D, 4D ``(X, Y, Z, C)`` or 5D ``(X, Y, Z, 1, C)`` images are read), a supported real data type whose
``bitpix`` agrees, finite positive spatial ``pixdim``, a finite qform (a unit quaternion) and sform when their
codes are set, a non-singular voxel-to-world affine and a ``vox_offset`` past the header. The pixel bytes must then
be exactly ``voxels x itemsize``: counted from the file size for ``.nii``, and while decompressing (bounded by the
claim) for ``.nii.gz``, whose decompressed bytes are handed to nibabel so the stream is inflated once.

A NIfTI pair (``.hdr`` + ``.img``) keeps its pixels in a second file; it is read only with
``allow_external_data=True``, and only when the ``.img`` is a regular file next to the ``.hdr``.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import MetaTensor

from medseg.core.errors import DataError
from medseg.io.checks import (
    ImageHeader,
    check_direction,
    check_origin,
    check_shape,
    check_spacing,
    check_voxel_cap,
    local_data_file,
    regular_file,
    size_error,
)
from medseg.io.geometry import check_affine, to_metatensor
from medseg.io.raster import unreadable_file_error

logger = logging.getLogger(__name__)

__all__ = ["nifti_header", "read_nifti"]

# NIfTI datatype code -> numpy dtype; complex, RGB, binary and float128 images are refused.
_DTYPES = {
    2: "uint8",
    4: "int16",
    8: "int32",
    16: "float32",
    64: "float64",
    256: "int8",
    512: "uint16",
    768: "uint32",
    1024: "int64",
    1280: "uint64",
}
_CHUNK = 1 << 20


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _refuse(path: Path, what: str, expected: str, hint: str | None = None) -> DataError:
    return DataError(
        f"{path.name}: {what}", expected=expected, hint=hint or "the NIfTI header is corrupt; re-export it", path=path
    )


def _read_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") if _is_gz(path) else open(path, "rb") as fh:
            return fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {path.name} as NIfTI ({type(exc).__name__}: {exc})",
            expected="a valid NIfTI file" + (" (gzip-compressed)" if _is_gz(path) else ""),
            hint="the file may be truncated or corrupt; re-export it",
            path=path,
        ) from None


def _parse(path: Path) -> nib.Nifti1Header:
    raw = _read_head(path)
    if len(raw) < 348:
        raise _refuse(path, f"holds {len(raw)} bytes", "a NIfTI header of 348 (NIfTI-1) or 540 (NIfTI-2) bytes")
    endian = None
    for order in ("<", ">"):
        size = int.from_bytes(raw[:4], "little" if order == "<" else "big")
        if size in (348, 540):
            endian = order
            break
    if endian is None:
        raise _refuse(
            path, f"does not start with a NIfTI header (sizeof_hdr {int.from_bytes(raw[:4], 'little')})", "348 or 540"
        )
    klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    if len(raw) < size:
        raise _refuse(path, f"holds {len(raw)} bytes", f"a {size}-byte NIfTI-{1 if size == 348 else 2} header")
    try:
        return klass(binaryblock=raw[:size], endianness=endian, check=False)
    except Exception as exc:  # nibabel raises HeaderDataError/ValueError for blocks it cannot take
        raise _refuse(path, f"unreadable NIfTI header ({type(exc).__name__}: {exc})", "a valid NIfTI header") from None


def _check_geometry(path: Path, hdr: nib.Nifti1Header, n_spatial: int) -> tuple[float, float, float]:
    pixdim = [float(v) for v in hdr["pixdim"]]
    spacing = check_spacing(path, pixdim[1 : 1 + n_spatial], "pixdim (voxel size)")
    if int(hdr["qform_code"]) > 0:
        quat = [float(hdr[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        check_origin(path, [float(hdr[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")], "qform offset")
        if not all(math.isfinite(v) for v in quat) or sum(v * v for v in quat) > 1.0 + 1e-6:
            raise _refuse(path, f"qform quaternion {quat} is not a rotation", "finite b, c, d with b²+c²+d² <= 1")
    if int(hdr["sform_code"]) > 0:
        srow = np.asarray([hdr["srow_x"], hdr["srow_y"], hdr["srow_z"]], dtype=np.float64)
        check_origin(path, srow[:, 3].tolist(), "sform offset")
        check_direction(path, srow[:, :3], "sform matrix")
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # nibabel refuses some qform/sform combinations itself
        raise _refuse(path, f"no usable affine ({type(exc).__name__}: {exc})", "a valid qform or sform") from None
    check_affine(affine, path.name)
    return (*spacing, *([1.0] * (3 - len(spacing))))  # type: ignore[return-value]


def nifti_header(path: Path, *, allow_external_data: bool = False, max_voxels: int | None = None) -> ImageHeader:
    """Read and check a NIfTI header (``.nii``, ``.nii.gz``, or the ``.hdr`` of a pair) without its pixels.

    Raises:
        DataError: any rule of the module docstring is broken, a pair is read without ``allow_external_data``, or
            the header claims more than ``max_voxels`` voxels.
    """
    file_size = regular_file(path)
    pair_suffix = path.name.lower().endswith(".hdr")
    hdr = _parse(path)
    magic = bytes(hdr["magic"]).rstrip(b"\x00")
    single, pair = magic in (b"n+1", b"n+2"), magic in (b"ni1", b"ni2")
    if not single and not pair:
        raise _refuse(path, f"magic {magic!r} is not NIfTI (an ANALYZE header?)", "NIfTI-1 or NIfTI-2 magic")
    if pair != pair_suffix:
        raise _refuse(
            path,
            f"magic {magic.decode(errors='replace')!r} does not fit the suffix",
            "n+1/n+2 in a .nii file, ni1/ni2 in a .hdr file",
        )
    dim = [int(v) for v in hdr["dim"]]
    if not 1 <= dim[0] <= 7:
        raise _refuse(path, f"dim[0] = {dim[0]}", "1 to 7 dimensions")
    sizes = check_shape(path, dim[1 : 1 + dim[0]], "dim")
    spatial: tuple[int, ...]
    if len(sizes) == 5 and sizes[3] == 1:  # vector images are (X, Y, Z, 1, C)
        spatial, channels = sizes[:3], sizes[4]
    elif 2 <= len(sizes) <= 4:
        spatial, channels = sizes[:3], sizes[3] if len(sizes) == 4 else 1
    else:
        raise _refuse(path, f"has shape {sizes}", "a 2D, 3D or 4D (X, Y, Z, C) NIfTI", "reshape or split the image")
    code = int(hdr["datatype"])
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise _refuse(
            path,
            f"datatype code {code} is not supported",
            "integer or float32/float64 voxels",
            "complex, RGB and 128-bit images are not read; convert the image",
        )
    itemsize = np.dtype(dtype).itemsize
    if int(hdr["bitpix"]) != 8 * itemsize:
        raise _refuse(path, f"bitpix {int(hdr['bitpix'])} disagrees with datatype {dtype}", f"bitpix {8 * itemsize}")
    spacing = _check_geometry(path, hdr, min(len(sizes), 3))
    scaling = [float(hdr["scl_slope"]), float(hdr["scl_inter"])]
    if any(math.isinf(v) for v in scaling):  # NaN means "no scaling" (nibabel writes it); infinity is a lie
        raise _refuse(path, f"scl_slope / scl_inter {scaling} are infinite", "finite scaling (or NaN / 0 for none)")
    offset_raw = float(hdr["vox_offset"])
    minimum = 0 if pair else int(hdr["sizeof_hdr"]) + 4
    if not math.isfinite(offset_raw) or offset_raw != int(offset_raw) or offset_raw < minimum:
        raise _refuse(path, f"vox_offset {offset_raw}", f"an integer >= {minimum} (the data follows the header)")
    offset = int(offset_raw)
    check_voxel_cap(path, math.prod(sizes), max_voxels)
    expected = math.prod(sizes) * itemsize
    data_file = path
    present: int | None = None
    if pair:
        data_file = local_data_file(path, path.name[: -len(".hdr")] + ".img", allow_external_data)
        present = regular_file(data_file) - offset
    elif not _is_gz(path):
        present = file_size - offset
    if present is not None and present != expected:
        raise size_error(path, f"after vox_offset {offset} the {'.img file' if pair else 'file'}", expected, present)
    shape = (*spatial, *([1] * (3 - len(spatial))))
    return ImageHeader(
        path=path,
        format="nifti",
        shape=shape,  # type: ignore[arg-type]
        channels=channels,
        voxels=math.prod(shape) * channels,
        spacing=spacing,
        dtype=dtype,
        external_data=pair,
        data_file=data_file,
        bytes_expected=expected,
        bytes_present=present,
        compression="gzip" if _is_gz(path) else "none",
    )


def _gz_bytes(path: Path, header: ImageHeader, offset: int) -> bytes:
    """The decompressed file, read in chunks up to one byte past what the header implies."""
    expected = header.bytes_expected or 0
    wanted = offset + expected
    buf = bytearray()
    try:
        with gzip.open(path, "rb") as fh:
            while len(buf) <= wanted and (chunk := fh.read(min(_CHUNK, wanted + 1 - len(buf)))):
                buf += chunk
    except EOFError:  # the stream ends early: report what arrived
        raise size_error(path, "the gzip stream", expected, max(0, len(buf) - offset)) from None
    except (OSError, zlib.error) as exc:
        raise DataError(
            f"{path.name}: the gzip stream is corrupt ({type(exc).__name__}: {exc})",
            expected="a valid .nii.gz file",
            hint="the file may be truncated or damaged; re-export it",
            path=path,
        ) from None
    if len(buf) != wanted:
        found = f"more than {expected}" if len(buf) > wanted else max(0, len(buf) - offset)
        raise size_error(path, "the decompressed file", expected, found)
    return bytes(buf)


def read_nifti(path: Path, header: ImageHeader) -> MetaTensor:
    """Decode a NIfTI file whose header :func:`nifti_header` accepted; returns ``MetaTensor (C, X, Y, Z)``."""
    img: nib.filebasedimages.FileBasedImage
    try:
        if header.compression == "gzip":
            hdr = _parse(path)
            data_bytes = _gz_bytes(path, header, int(hdr["vox_offset"]))
            klass = nib.Nifti1Image if int(hdr["sizeof_hdr"]) == 348 else nib.Nifti2Image
            img = klass.from_bytes(data_bytes)
        else:
            img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.Nifti1Pair):
            raise DataError(f"{path.name} is not a NIfTI image", expected="NIfTI-1 or NIfTI-2", path=path)
        data = img.get_fdata(dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for a broken file; none may escape raw
        raise unreadable_file_error(path, "NIfTI", exc) from exc
    if data.ndim == 5:  # NIfTI vector images are (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    if data.ndim == 2:
        data = data[..., None]
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    affine = check_affine(affine, path.name)
    return to_metatensor(data, affine, {"filename_or_obj": str(path), "source_format": "nifti"})
