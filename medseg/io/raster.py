"""2D images (PNG, JPEG, TIFF, BMP and single DICOM files) as one-slice volumes of the medseg image contract.

A 2D image is a volume of one slice: a float32 ``MetaTensor`` ``(C, X, Y, 1)`` with a RAS ``.affine``, where X is
the column index and Y the row index (the pixel at row ``r``, column ``c`` of the file is ``image[:, c, r, 0]``), as
for DICOM series (:func:`medseg.io.dicom.read_dicom_series`).

Channels: grey images have C=1 and colour images C=3; an alpha channel is dropped; palette images become grey
(C=1) when every palette entry they use is grey, else RGB (C=3); CMYK/YCbCr/Lab JPEGs are converted to RGB.
16-bit and float pixels keep their values. Pixels are read as stored: an EXIF orientation tag is not applied (a
warning names it) and inverted greyscale (TIFF MinIsWhite, DICOM MONOCHROME1) is not flipped.

Decoders: Pillow for PNG, JPEG and BMP, except 16-bit colour PNGs (which Pillow reduces to 8 bits), read with
SimpleITK; tifffile for TIFF (exact for every sample format: 16-bit RGB, float, multi-channel), with Pillow as
fallback for TIFF flavours tifffile does not decode (palette, CMYK, YCbCr or a missing codec); pydicom for DICOM.

Pixel size: raster files map pixels to ``diag(sx, sy, 1, 1)`` in mm. ``sx``, ``sy`` come from a physical
resolution the file declares - a PNG ``pHYs`` chunk in pixels per metre, or TIFF ``XResolution``/``YResolution``
with ``ResolutionUnit`` inch or centimetre - when it is sane: a pixel size between 1e-5 mm and 10 mm that is not a
72 or 96 dpi screen default (which editors write whatever the content). Otherwise pixels are 1 mm. JPEG and BMP
densities are ignored (cameras and editors write placeholders). DICOM files with ImagePositionPatient and
ImageOrientationPatient get the patient-space affine of the series reader (LPS converted to RAS); without them,
``diag(column spacing, row spacing, 1, 1)`` from PixelSpacing, ImagerPixelSpacing or the ultrasound region
calibration (SequenceOfUltrasoundRegions), else 1 mm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.core.atomic import atomic_write
from medseg.core.errors import DataError, ModelInputError
from medseg.io.checks import regular_file
from medseg.io.dicom import (
    NON_IMAGE_MODALITIES,
    REFERENCED_SYNTAXES,
    PixelClaim,
    check_claim,
    float_values,
    pixel_claim,
)
from medseg.io.geometry import LPS_RAS_FLIP, check_affine, to_metatensor

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "RASTER_SUFFIXES",
    "RASTER_WRITE_SUFFIXES",
    "dicom_file_claim",
    "raster_channels",
    "read_dicom_image",
    "read_raster",
    "unreadable_file_error",
    "write_atomic",
    "write_raster",
]

#: Suffixes :func:`read_raster` reads.
RASTER_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Suffixes :func:`read_dicom_image` reads (one DICOM file holding one 2D image).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm",)
#: Suffixes :func:`write_raster` writes (lossless formats only).
RASTER_WRITE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff")

_TIFF_SUFFIXES = (".tif", ".tiff")
_MIN_PIXEL_MM, _MAX_PIXEL_MM = 1e-5, 10.0
_PLACEHOLDER_DPI = (72.0, 96.0)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_PHOTOMETRIC_TIFFFILE = (0, 1, 2)  # MinIsWhite, MinIsBlack, RGB: decoded exactly by tifffile
_ALPHA_EXTRASAMPLES = (1, 2)  # associated and unassociated alpha
_ONE_SLICE = "PNG/TIFF hold one 2D slice; write NIfTI for volumes"


def unreadable_file_error(path: Path, fmt: str, exc: BaseException) -> DataError:
    """The ``DataError`` for a file a decoder library failed on, naming the file, format and the library's reason."""
    detail = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {detail[-1] if detail else ''}".rstrip(": ")
    return DataError(
        f"cannot read {path.name} as {fmt} ({reason})",
        expected=f"a valid {fmt} file",
        hint="the file may be truncated or corrupt; re-export it",
        path=path,
    )


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """:func:`medseg.core.atomic.atomic_write`, reporting writer failures as ``DataError``."""
    try:
        return atomic_write(path, write)
    except Exception as exc:  # writer libraries raise RuntimeError/OSError/ValueError; report them uniformly
        raise DataError(
            f"could not write {path.name} ({type(exc).__name__}: {str(exc).strip()[-300:]})",
            expected="a writable destination",
            path=path,
        ) from exc


def _not_single_image(path: Path, what: str) -> DataError:
    return DataError(
        f"{path.name} holds {what}",
        expected="a single 2D image",
        hint="save each 2D image as its own file, or a 3D volume as NIfTI",
        path=path,
    )


# --------------------------------------------------------------------------------------------------- pixel size


def _spacing_from_dpi(dpi: Any) -> tuple[float, float] | None:
    """Pixel size ``(sx, sy)`` in mm from a ``(x, y)`` resolution in dots per inch; None unless sane (module doc)."""
    try:
        x_dpi, y_dpi = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (x_dpi, y_dpi)):
        return None
    if all(any(abs(v - p) < 0.05 for p in _PLACEHOLDER_DPI) for v in (x_dpi, y_dpi)):
        return None
    spacing = (25.4 / x_dpi, 25.4 / y_dpi)
    if not all(_MIN_PIXEL_MM <= s <= _MAX_PIXEL_MM for s in spacing):
        return None
    return spacing


def _rational(value: Any) -> float:
    if isinstance(value, tuple | list) and len(value) == 2:
        return float(value[0]) / float(value[1]) if float(value[1]) else math.nan
    return float(value)


def _tiff_spacing(page: Any) -> tuple[float, float] | None:
    """Pixel size from a tifffile page's resolution tags (ResolutionUnit inch by default, as the TIFF spec says)."""
    tags = page.tags
    x_tag, y_tag, unit_tag = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if x_tag is None or y_tag is None:
        return None
    unit = int(unit_tag.value) if unit_tag is not None else 2
    per_inch = {2: 1.0, 3: 2.54}.get(unit)
    if per_inch is None:  # ResolutionUnit NONE: an aspect ratio, not a size
        return None
    try:
        return _spacing_from_dpi((_rational(x_tag.value) * per_inch, _rational(y_tag.value) * per_inch))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


# --------------------------------------------------------------------------------------------------- decoding


def _palette_pixels(im: Any) -> np.ndarray:
    """``(rows, cols, C)`` from a palette image: grey (C=1) when every used entry is grey, else RGB (C=3)."""
    index = np.asarray(im.getchannel("P") if im.mode == "PA" else im)
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    if index.size == 0 or int(index.max()) >= palette.shape[0]:
        return np.asarray(im.convert("RGB"))
    used = palette[np.unique(index)]
    if np.all(used[:, 0] == used[:, 1]) and np.all(used[:, 1] == used[:, 2]):
        return palette[index, :1]
    return palette[index]


def _pillow_pixels(im: Any) -> np.ndarray:
    """Decode a Pillow image into ``(rows, cols, C)`` following the channel rules of the module docstring."""
    bands = im.getbands()
    if "P" in bands:
        return _palette_pixels(im)
    if bands[0] in ("1", "L", "I", "F") and len(bands) <= 2:  # grey, grey + alpha
        arr = np.asarray(im.getchannel(0) if len(bands) == 2 else im)
        return (arr.astype(np.uint8) if arr.dtype == bool else arr)[..., None]
    if im.mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
        im = im.convert("RGB")
    return np.asarray(im)[..., :3]


def _png_is_16bit_colour(path: Path) -> bool:
    """Whether a PNG's IHDR declares 16-bit colour or grey + alpha, which Pillow would reduce to 8 bits."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return False
    return head[24] == 16 and head[25] in (2, 4, 6)


def _sitk_png_pixels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO="PNGImageIO"))
    if arr.ndim == 2:
        return arr[..., None]
    return arr[..., :1] if arr.shape[-1] == 2 else arr[..., :3] if arr.shape[-1] == 4 else arr


def _warn_exif_orientation(im: Any, path: Path) -> None:
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not stop reading the pixels
        return
    if orientation not in (None, 1):
        logger.warning("%s: EXIF orientation %s is not applied; pixels are read as stored", path.name, orientation)


def _read_pillow(path: Path, fmt: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                raise _not_single_image(path, f"{frames} frames (a multi-page image or stack)")
            spacing = _spacing_from_dpi(im.info["dpi"]) if im.format in ("PNG", "TIFF") and "dpi" in im.info else None
            if im.format == "JPEG":
                _warn_exif_orientation(im, path)
            pixels = _sitk_png_pixels(path) if im.format == "PNG" and _png_is_16bit_colour(path) else _pillow_pixels(im)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
        raise unreadable_file_error(path, fmt, exc) from exc
    return pixels, spacing


def _tiff_channels_kept(page: Any) -> list[int]:
    """Sample indices of a tifffile page that are image channels (alpha extra samples dropped)."""
    samples = int(page.samplesperpixel)
    extras = [int(e) for e in (page.extrasamples or ())]
    first_extra = samples - len(extras)
    return [s for s in range(samples) if s < first_extra or extras[s - first_extra] not in _ALPHA_EXTRASAMPLES]


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            if pages > 1:
                raise _not_single_image(path, f"{pages} pages (a multi-page TIFF or stack)")
            page = cast("tifffile.TiffPage", tif.pages[0])  # a first page is a TiffPage, never a frame
            if int(page.photometric) not in _TIFF_PHOTOMETRIC_TIFFFILE:
                return _read_pillow(path, "TIFF")
            axes = str(page.axes)
            if set(axes) - {"Y", "X", "S"}:
                raise _not_single_image(path, f"an image with axes {axes} (shape {tuple(page.shape)})")
            arr = page.asarray()
            keep = _tiff_channels_kept(page)
            spacing = _tiff_spacing(page)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a codec tifffile lacks; Pillow decodes other flavours
        logger.debug("%s: tifffile failed (%s: %s); trying Pillow", path.name, type(exc).__name__, exc)
        try:
            return _read_pillow(path, "TIFF")
        except DataError as err:
            raise unreadable_file_error(path, "TIFF", exc) from err
    if np.iscomplexobj(arr):
        raise DataError(f"{path.name} holds complex pixels", expected="real-valued pixels", path=path)
    arr = np.moveaxis(arr, axes.index("S"), -1) if "S" in axes else arr[..., None]
    arr = arr[..., keep] if len(keep) != arr.shape[-1] else arr
    return (arr.astype(np.uint8) if arr.dtype == bool else arr), spacing


def read_raster(path: str | Path) -> MetaTensor:
    """Read a 2D PNG, JPEG, TIFF or BMP image as a one-slice volume.

    Channel, decoder and pixel-size rules are given in the module docstring.

    Args:
        path: a ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff`` or ``.bmp`` file.

    Returns:
        ``MetaTensor`` ``(C, X, Y, 1)`` float32, X = column index, Y = row index; ``.affine`` is
        ``diag(sx, sy, 1, 1)`` (mm); ``.meta`` holds ``filename_or_obj``, ``source_format="raster"``,
        ``pixel_size_source`` (``"file"`` or ``"default"``), ``original_affine``, ``spatial_shape`` and
        ``space="RAS"``.

    Raises:
        DataError: missing file, unsupported suffix, a multi-page file or stack, or a corrupt file.

    Examples::

        >>> img = read_raster("ihc.png")
        >>> tuple(img.shape)
        (3, 512, 512, 1)
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in RASTER_SUFFIXES:
        raise DataError(f"{p.name} is not a 2D raster image", expected=f"one of {', '.join(RASTER_SUFFIXES)}", path=p)
    if not p.is_file():
        raise DataError(f"{p} not found", expected="an existing image file", path=p)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}.get(suffix, "TIFF")
    pixels, spacing = _read_tiff(p) if suffix in _TIFF_SUFFIXES else _read_pillow(p, fmt)
    data = np.transpose(pixels, (2, 1, 0))[..., None]  # (rows, cols, C) -> (C, X = col, Y = row, 1)
    sx, sy = spacing or (1.0, 1.0)
    meta = {
        "filename_or_obj": str(p),
        "source_format": "raster",
        "pixel_size_source": "default" if spacing is None else "file",
    }
    return to_metatensor(data, np.diag([sx, sy, 1.0, 1.0]), meta)


# --------------------------------------------------------------------------------------------------- DICOM


def _valid_spacing(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    if values is None or len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return float(values[0]), float(values[1])


def _ultrasound_spacing(ds: Any) -> tuple[float, float] | None:
    """``(row, column)`` spacing in mm from the first 2D tissue region calibrated in cm, else None."""
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
        if region.get("RegionSpatialFormat") != 1 or units != (3, 3):
            continue
        deltas = float_values([region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX")])
        spacing = _valid_spacing(tuple(10.0 * abs(d) for d in deltas) if deltas else None)
        if spacing is not None:
            return spacing
    return None


def _dicom_geometry_error(path: Path, what: str, expected: str) -> DataError:
    return DataError(
        f"{path.name}: {what}",
        expected=expected,
        hint="the image geometry is invalid; fix the header rather than guess it",
        path=path,
    )


def _dicom_affine(ds: Any, path: Path) -> tuple[np.ndarray, str]:
    """RAS affine ``(4, 4)`` of a single-frame DICOM image and where its geometry came from."""
    ipp, iop = float_values(ds.get("ImagePositionPatient")), float_values(ds.get("ImageOrientationPatient"))
    if ipp is not None and iop is not None:
        spacing = _valid_spacing(float_values(ds.get("PixelSpacing")))
        if spacing is None:
            raise _dicom_geometry_error(
                path, f"invalid PixelSpacing {ds.get('PixelSpacing')}", "two finite, positive PixelSpacing values (mm)"
            )
        if len(ipp) != 3 or len(iop) != 6 or not all(math.isfinite(v) for v in (*ipp, *iop)):
            raise _dicom_geometry_error(
                path, f"invalid ImagePositionPatient {ipp} or ImageOrientationPatient {iop}", "3 and 6 finite values"
            )
        row_cos, col_cos = np.asarray(iop[:3]), np.asarray(iop[3:])
        norms = np.linalg.norm(row_cos), np.linalg.norm(col_cos)
        if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(row_cos @ col_cos) > 1e-3:
            raise _dicom_geometry_error(
                path, f"ImageOrientationPatient {iop} is not two orthonormal vectors", "unit cosines"
            )
        row_cos, col_cos = row_cos / norms[0], col_cos / norms[1]
        normal = np.cross(row_cos, col_cos)
        thickness = float_values(ds.get("SliceThickness"))
        gap = thickness[0] if thickness and math.isfinite(thickness[0]) and thickness[0] > 0 else 1.0
        row_spacing, col_spacing = spacing
        lps = np.eye(4)
        lps[:3, 0] = row_cos * col_spacing
        lps[:3, 1] = col_cos * row_spacing
        lps[:3, 2] = normal / np.linalg.norm(normal) * gap
        lps[:3, 3] = ipp
        return LPS_RAS_FLIP @ lps, "patient"
    for source in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(source) not in (None, ""):
            spacing = _valid_spacing(float_values(ds.get(source)))
            if spacing is None:
                raise _dicom_geometry_error(
                    path, f"invalid {source} {ds.get(source)}", f"two finite, positive {source} values (mm)"
                )
            return np.diag([spacing[1], spacing[0], 1.0, 1.0]), source
    spacing = _ultrasound_spacing(ds)
    if spacing is not None:
        return np.diag([spacing[1], spacing[0], 1.0, 1.0]), "SequenceOfUltrasoundRegions"
    return np.eye(4), "default"


def dicom_file_claim(path: Path) -> tuple[PixelClaim, Any]:
    """Read a single DICOM file's header (no pixels) and refuse what :func:`read_dicom_image` cannot read.

    Returns:
        The file's :class:`~medseg.io.dicom.PixelClaim` and its pydicom header dataset.

    Raises:
        DataError: not a regular file, not DICOM, a DICOMDIR, no pixel data, a non-image object, a multi-frame image,
            or a header whose pixel claim does not match the bytes present (:func:`medseg.io.dicom.check_claim`).
    """
    import pydicom

    size = regular_file(path, "an existing DICOM file")
    try:
        with open(path, "rb") as fh:
            head = pydicom.dcmread(fh, stop_before_pixels=True)
            claim = pixel_claim(fh, head, size)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error ... for broken files
        raise unreadable_file_error(path, "DICOM", exc) from exc
    modality = str(head.get("Modality", "") or "").upper()
    sop_class = str(getattr(getattr(head, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in head:
        raise DataError(
            f"{path.name} is a DICOMDIR, an index that references other files",
            expected="a DICOM image file",
            hint="pass the folder (or a zip) of the series instead",
            path=path,
        )
    if claim.transfer_syntax in REFERENCED_SYNTAXES or "PixelDataProviderURL" in head:
        check_claim(claim, path, head)  # refuses pixel data held elsewhere
    if claim.element is None:
        raise DataError(
            f"{path.name} holds no pixel data ({modality or 'no modality'})", expected="a DICOM image", path=path
        )
    if modality in NON_IMAGE_MODALITIES:
        raise DataError(f"{path.name} is a {modality} object, not an image", expected="a DICOM image", path=path)
    if claim.frames is not None and claim.frames > 1:
        raise DataError(
            f"{path.name}: multi-frame images (NumberOfFrames > 1) are not supported yet",
            expected="a single-frame 2D image",
            hint="export the frame you need as its own file, or pass the folder of a single-frame series",
            path=path,
        )
    check_claim(claim, path, head)
    return claim, head


def read_dicom_image(path: str | Path) -> MetaTensor:
    """Read one single-frame DICOM file (CT/MR slice, ultrasound frame, X-ray, photo) as a one-slice volume.

    Pixels are decoded by pydicom: RescaleSlope/RescaleIntercept (or a Modality LUT) are applied to grey images,
    YBR colour is converted to RGB and PALETTE COLOR through its lookup table. The affine follows the module
    docstring; with ImagePositionPatient/ImageOrientationPatient it equals the one
    :func:`medseg.io.dicom.read_dicom_series` gives a one-slice series (slice thickness, or 1 mm, as third axis).

    Args:
        path: a ``.dcm`` file holding one 2D image.

    Returns:
        ``MetaTensor`` ``(C, X, Y, 1)`` float32 (C=1 grey, C=3 colour; X = column, Y = row) in rescaled units
        (e.g. HU); meta has ``source_format="dicom"``, ``modality``, ``series_uid``, ``study_uid``,
        ``sop_instance_uid``, ``photometric_interpretation`` and ``geometry_source`` ("patient", "PixelSpacing",
        "ImagerPixelSpacing", "SequenceOfUltrasoundRegions" or "default").

    Raises:
        DataError: not a DICOM file, no pixel data, a non-image object (SEG, RTSTRUCT, ...), a multi-frame image,
            a header whose Rows/Columns/BitsAllocated/SamplesPerPixel disagree with the pixel bytes present (see
            :func:`dicom_file_claim`), pixel data pydicom cannot decode, invalid patient geometry, or a present
            but invalid PixelSpacing / ImagerPixelSpacing.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    p = Path(path)
    dicom_file_claim(p)
    try:
        ds = pydicom.dcmread(p)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error ... for broken files
        raise unreadable_file_error(p, "DICOM", exc) from exc
    modality = str(ds.get("Modality", "") or "").upper()
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    try:
        pixels = ds.pixel_array
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        elif pixels.ndim == 2:
            pixels = apply_modality_lut(pixels, ds)
    except Exception as exc:  # pydicom raises RuntimeError/ValueError/NotImplementedError for undecodable data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(
            f"could not decode the pixel data of {p.name} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
            expected=f"pixel data pydicom can decode (transfer syntax {getattr(syntax, 'name', syntax)})",
            hint="the file may be truncated, or compressed in a way pydicom cannot decode here; decompress it "
            "(e.g. gdcmconv --raw) and retry",
            path=p,
        ) from exc
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[:2] != (ds.Rows, ds.Columns):
        raise _not_single_image(p, f"pixel data of shape {pixels.shape} (Rows {ds.Rows}, Columns {ds.Columns})")
    affine, geometry_source = _dicom_affine(ds, p)
    meta = {
        "filename_or_obj": str(p),
        "source_format": "dicom",
        "modality": modality,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "photometric_interpretation": photometric,
        "geometry_source": geometry_source,
    }
    affine = check_affine(affine, p.name)
    return to_metatensor(np.transpose(pixels, (2, 1, 0))[..., None], affine, meta)


# --------------------------------------------------------------------------------------------------- header peek


def raster_channels(path: str | Path) -> int:
    """Number of channels :func:`read_raster` / :func:`read_dicom_image` would return, reading headers only.

    Palette PNGs are decoded (their channel count depends on the palette entries used).

    Raises:
        DataError: the file is unreadable or its suffix is not a 2D image suffix.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        import pydicom

        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:  # broken header
            raise unreadable_file_error(p, "DICOM", exc) from exc
        palette = str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
        return 3 if palette else int(ds.get("SamplesPerPixel", 1) or 1)
    if suffix in _TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                page = cast("tifffile.TiffPage", tif.pages[0])  # a first page is a TiffPage, never a frame
                if int(page.photometric) in _TIFF_PHOTOMETRIC_TIFFFILE:
                    return len(_tiff_channels_kept(page))
        except Exception:  # noqa: BLE001 - Pillow or the full reader reports what is wrong below
            logger.debug("%s: tifffile cannot read the header; trying Pillow", p.name)
    if suffix not in RASTER_SUFFIXES:
        raise DataError(f"{p.name} is not a 2D image", expected=f"one of {', '.join(RASTER_SUFFIXES)}, .dcm", path=p)
    from PIL import Image

    try:
        with Image.open(p) as im:
            bands = im.getbands()
            if "P" in bands:
                return int(_palette_pixels(im).shape[-1])
            if bands[0] in ("1", "L", "I", "F") and len(bands) <= 2:
                return 1
            return 3
    except Exception as exc:  # unreadable header
        raise unreadable_file_error(p, p.suffix.lstrip(".").upper(), exc) from exc


# --------------------------------------------------------------------------------------------------- writing


def _mask_2d(mask: Any) -> np.ndarray:
    """A label map as ``(X, Y)``: accepts ``(X, Y)``, ``(X, Y, 1)`` and ``(1, X, Y, 1)``."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"mask has shape {arr.shape}", expected="(X, Y) or (X, Y, 1) labels", hint=_ONE_SLICE)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr))):
        raise ModelInputError("mask has non-integer values", expected="integer labels", hint="argmax the logits")
    if arr.dtype.kind not in "iuf":
        raise ModelInputError(f"mask has dtype {arr.dtype}", expected="an integer label map")
    return arr


def write_raster(mask: Any, path: str | Path, *, spacing: tuple[float, float] | None = None) -> Path:
    """Write a 2D label map as a PNG or TIFF file, atomically.

    Args:
        mask: integer labels ``(X, Y)``, ``(X, Y, 1)`` or ``(1, X, Y, 1)`` (numpy array or tensor), X = column.
        path: ``.png``, ``.tif`` or ``.tiff`` output file.
        spacing: pixel size ``(sx, sy)`` in mm, stored as the file's resolution (PNG ``pHYs`` in pixels per metre,
            TIFF resolution in dots per inch) so that :func:`read_raster` gives the same pixel size; None writes none.

    Returns:
        ``path`` as a ``Path``; pixels are uint8 when every label is below 256, else uint16, stored as
        ``(rows, cols)`` = ``(Y, X)``.

    Raises:
        DataError: more than one slice, labels outside 0..65535, an unsupported suffix or an unwritable path.
        ModelInputError: non-integer values.
    """
    from PIL import Image

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in RASTER_WRITE_SUFFIXES:
        raise DataError(
            f"cannot write {out.name} as a 2D mask", expected=f"one of {', '.join(RASTER_WRITE_SUFFIXES)}", path=out
        )
    arr = _mask_2d(mask)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(
            f"mask for {out.name} has labels {lo}..{hi}",
            expected="labels 0..65535 in a PNG/TIFF mask",
            hint="write NIfTI for negative or larger label values",
            path=out,
        )
    rows_cols = np.ascontiguousarray(arr.T.astype(np.uint8 if hi < 256 else np.uint16))
    options: dict[str, Any] = {"format": "PNG" if suffix == ".png" else "TIFF"}
    if suffix != ".png":
        options["compression"] = "tiff_deflate"
    if spacing is not None:
        options["dpi"] = tuple(25.4 / float(s) for s in spacing)

    def write(tmp: Path) -> None:
        Image.fromarray(rows_cols).save(tmp, **options)

    return write_atomic(out, write)
