"""``read_header``: what an image file claims about itself, checked, without decoding its pixels.

One entry point for every format :func:`medseg.io.load_image` reads. It applies the same refusals as the readers
(see :mod:`medseg.io.checks`, :mod:`medseg.io.nifti`, :mod:`medseg.io.textheaders`, :mod:`medseg.io.dicom`), so a
caller such as a server can cap the voxel count and refuse a lying file before paying for the decode:

* NIfTI, NRRD, MetaImage: the header parsed by medseg; pixel bytes counted (raw data) or decompressed without being
  kept, one byte past the claim at most (gzip, zlib, bzip2 streams; a ``.nii.gz`` is counted when it is decoded).
* DICOM (a folder, a zip, or one ``.dcm`` file): pydicom headers only; each file's pixel data length is read from
  its element header and compared with Rows x Columns x SamplesPerPixel x frames x BitsAllocated. X-ray angiography
  and ultrasound files are described by their modality adapter (:mod:`medseg.io.modality`).
* PNG, JPEG, BMP, TIFF: Pillow / tifffile headers; TIFF strips must lie inside the file and an uncompressed TIFF must
  hold the bytes its size implies. Compressed raster data is checked when it is decoded.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from medseg.core.errors import ConfigError, DataError
from medseg.io.archive import ZipLimits, safe_extract_zip
from medseg.io.checks import ImageHeader, check_shape, check_voxel_cap, regular_file, size_error
from medseg.io.dicom import series_header
from medseg.io.geometry import check_affine, spacing_from_affine
from medseg.io.modality import find_adapter
from medseg.io.nifti import nifti_header
from medseg.io.raster import (
    _TIFF_PHOTOMETRIC_TIFFFILE,
    _TIFF_SUFFIXES,
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    _dicom_affine,
    _spacing_from_dpi,
    _tiff_channels_kept,
    _tiff_spacing,
    dicom_file_claim,
    unreadable_file_error,
)
from medseg.io.textheaders import metaimage_header, nrrd_header

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "ImageHeader", "image_suffix", "read_header"]

#: Volume suffixes and their reader.
FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".hdr": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
#: Suffixes ``load_image`` reads (besides a DICOM folder).
IMAGE_SUFFIXES: tuple[str, ...] = (*FORMATS, *RASTER_SUFFIXES, *DICOM_SUFFIXES, ".zip")
_PILLOW_DTYPES = {"1": "bool", "I": "int32", "F": "float32", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16"}


def image_suffix(path: Path) -> str:
    """The lower-case suffix that picks the reader (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _tiff_header(path: Path, size: int) -> ImageHeader | None:
    """The header of a TIFF tifffile reads (None: leave it to Pillow), checking that strips lie inside the file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            page = cast("tifffile.TiffPage", tif.pages[0])  # a first page is a TiffPage, never a frame
            shape, dtype = tuple(int(s) for s in page.shape), np.dtype(page.dtype)
            offsets, counts = tuple(page.dataoffsets), tuple(page.databytecounts)
            compression, bits = int(page.compression), int(page.bitspersample)
            photometric = int(page.photometric)
            keep = _tiff_channels_kept(page)
            spacing = _tiff_spacing(page)
            dims = (int(page.imagewidth), int(page.imagelength))
    except Exception as exc:  # noqa: BLE001 - tifffile cannot parse it; Pillow may (palette, CMYK, old JPEG)
        logger.debug("%s: tifffile cannot read the header (%s); trying Pillow", path.name, exc)
        return None
    if pages > 1:
        raise DataError(
            f"{path.name} holds {pages} pages (a multi-page TIFF or stack)",
            expected="a single 2D image",
            hint="save each 2D image as its own file, or a 3D volume as NIfTI",
            path=path,
        )
    check_shape(path, dims, "image width x length")
    for offset, count in zip(offsets, counts, strict=False):
        if offset < 0 or count < 0 or offset + count > size:
            raise size_error(path, f"the TIFF strip at offset {offset}", count, max(0, size - offset))
    expected = math.prod(shape) * dtype.itemsize
    if compression == 1 and bits >= 8 and sum(counts) < expected:
        raise size_error(path, "the uncompressed TIFF", expected, sum(counts))
    if photometric not in _TIFF_PHOTOMETRIC_TIFFFILE:
        return None
    sx, sy = spacing or (1.0, 1.0)
    return ImageHeader(
        path=path,
        format="raster",
        shape=(dims[0], dims[1], 1),
        channels=len(keep),
        voxels=dims[0] * dims[1] * len(keep),
        spacing=(sx, sy, 1.0),
        dtype=str(dtype),
        data_file=path,
        bytes_expected=expected,
        bytes_present=sum(counts) if compression == 1 else None,
        compression="none" if compression == 1 else f"tiff-{compression}",
    )


def _jpeg_scan_start(path: Path) -> tuple[int, bool] | None:
    """Offset of the first scan's data and whether the frame is Huffman-coded, walking the JPEG's marker segments."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    at, huffman = 2, True
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            huffman = marker < 0xC8  # SOF9..SOF15 are arithmetic-coded
        if marker == 0xDA:
            return at + 2 + length, huffman
        at += 2 + length
    return None


def _check_jpeg_size(path: Path, width: int, height: int, file_size: int) -> None:
    """Refuse a JPEG too short for the size its frame header claims.

    Every 8 x 8 block of a Huffman-coded JPEG costs at least one bit (its DC code), so a claim of ``W x H`` pixels
    needs at least ``ceil(W / 8) * ceil(H / 8) / 8`` bytes of scan data. A header that claims more is a lie that
    libjpeg would silently pad with grey.
    """
    found = _jpeg_scan_start(path)
    if found is None or not found[1]:
        return
    needed = math.ceil(math.ceil(width / 8) * math.ceil(height / 8) / 8)
    present = file_size - found[0]
    if present < needed:
        raise size_error(
            path, f"the JPEG scan data for {width} x {height} pixels", needed, present, "the frame header lies"
        )


def _pillow_header(path: Path) -> ImageHeader:
    from PIL import Image

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}.get(path.suffix.lower(), "TIFF")
    try:
        with Image.open(path) as im:
            width, height = im.size
            bands, mode, frames = im.getbands(), im.mode, int(getattr(im, "n_frames", 1) or 1)
            decoder = im.format
            dpi: Any = im.info.get("dpi") if im.format in ("PNG", "TIFF") else None
    except Exception as exc:  # UnidentifiedImageError, DecompressionBombError, OSError, SyntaxError ...
        raise unreadable_file_error(path, fmt, exc) from exc
    if frames > 1:
        raise DataError(
            f"{path.name} holds {frames} frames (a multi-page image or stack)",
            expected="a single 2D image",
            hint="save each 2D image as its own file, or a 3D volume as NIfTI",
            path=path,
        )
    check_shape(path, (width, height), "image size")
    if decoder == "JPEG":
        _check_jpeg_size(path, width, height, path.stat().st_size)
    grey = bands[0] in ("1", "L", "I", "F") and len(bands) <= 2
    channels = 1 if grey else 3  # a palette image counts 3 (it may use colour entries)
    spacing = _spacing_from_dpi(dpi) if dpi is not None else None
    sx, sy = spacing or (1.0, 1.0)
    dtype = _PILLOW_DTYPES.get(mode, "uint16" if mode.startswith("I;16") else "uint8")
    return ImageHeader(
        path=path,
        format="raster",
        shape=(width, height, 1),
        channels=channels,
        voxels=width * height * channels,
        spacing=(sx, sy, 1.0),
        dtype=dtype,
        data_file=path,
        bytes_expected=width * height * len(bands) * np.dtype(dtype).itemsize,
        compression=fmt.lower(),
    )


def _dicom_header(path: Path) -> ImageHeader:
    adapter = find_adapter(path)  # X-ray angiography, ultrasound: single and multi-frame (medseg.io.modality)
    if adapter is not None:
        return adapter.header(path)
    claim, head = dicom_file_claim(path)
    palette = str(head.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
    channels = 3 if palette else int(claim.samples or 1)
    shape = (int(claim.columns or 0), int(claim.rows or 0), 1)
    affine, _ = _dicom_affine(head, path)  # header-only: refuses invalid spacing and patient geometry
    spacing = spacing_from_affine(check_affine(affine, path.name))
    return ImageHeader(
        path=path,
        format="dicom",
        shape=shape,
        channels=channels,
        voxels=shape[0] * shape[1] * channels,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        dtype=claim.dtype,
        data_file=path,
        bytes_expected=claim.expected,
        bytes_present=claim.present,
        compression="none" if claim.native else claim.transfer_syntax,
    )


def read_header(
    path: str | Path,
    *,
    allow_external_data: bool = False,
    max_voxels: int | None = None,
    series_uid: str | None = None,
    zip_limits: ZipLimits | None = None,
) -> ImageHeader:
    """Read and check what an image file (or DICOM folder / zip) claims, without decoding its pixels.

    Args:
        path: any input :func:`medseg.io.load_image` reads.
        allow_external_data: accept a header whose pixels are in another local file (a detached ``.nhdr``/``.mhd``,
            a NIfTI ``.hdr``/``.img`` pair), provided it is one regular file inside the header's folder. Off by
            default; a server must never turn it on for uploads.
        max_voxels: refuse a header claiming more voxels (times channels) than this (None: no cap).
        series_uid: DICOM folder or zip: the series to describe (default: the one ``load_image`` would read).
        zip_limits: limits for extracting a zip (``ZipLimits()`` if None).

    Returns:
        The :class:`~medseg.io.checks.ImageHeader` (shape, channels, voxel count, spacing, stored dtype, where the
        pixel data is, the bytes it should and does hold where knowable).

    Raises:
        DataError: a missing or unsupported file, a header that lies (see the module docstring), external data
            without ``allow_external_data``, or more than ``max_voxels`` voxels.
        ConfigError: ``series_uid`` given for a file other than a DICOM folder or zip.

    Examples::

        >>> header = read_header("case001.nii.gz")
        >>> header.shape, header.voxels, header.dtype
        ((256, 256, 120), 7864320, 'int16')
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} not found", expected="an existing image file or DICOM folder", path=p)
    if p.is_dir():
        return series_header(p, series_uid=series_uid, max_voxels=max_voxels)
    suffix = image_suffix(p)
    if suffix == ".zip":
        with tempfile.TemporaryDirectory(prefix="medseg-zip-") as tmp:
            folder = safe_extract_zip(p, tmp, zip_limits)
            try:
                header = series_header(folder, series_uid=series_uid, max_voxels=max_voxels)
            except DataError as err:  # name the zip, not the temporary folder
                raise DataError(
                    err.what.replace(str(folder), p.name), expected=err.expected, hint=err.hint, path=p
                ) from err
        return replace(header, path=p, data_file=p)
    fmt = FORMATS.get(suffix)
    if fmt is None and suffix not in RASTER_SUFFIXES and suffix not in DICOM_SUFFIXES:
        raise DataError(
            f"{p.name} has an unsupported suffix {suffix or '(none)'}",
            expected=f"one of {', '.join(IMAGE_SUFFIXES)} or a folder of DICOM files",
            hint="convert the image to NIfTI, or pass the folder that holds the DICOM series",
            path=p,
        )
    if series_uid is not None:
        raise ConfigError(
            f"series_uid given for {p.name}", expected="series_uid only with a DICOM folder or zip", path=p
        )
    if fmt == "nifti":
        header = nifti_header(p, allow_external_data=allow_external_data, max_voxels=max_voxels)
    elif fmt == "nrrd":
        header = nrrd_header(p, allow_external_data=allow_external_data, max_voxels=max_voxels)
    elif fmt == "metaimage":
        header = metaimage_header(p, allow_external_data=allow_external_data, max_voxels=max_voxels)
    elif suffix in DICOM_SUFFIXES:
        header = _dicom_header(p)
    else:
        size = regular_file(p)
        found = _tiff_header(p, size) if suffix in _TIFF_SUFFIXES else None
        header = found or _pillow_header(p)
    check_voxel_cap(p, header.voxels, max_voxels)
    return header
