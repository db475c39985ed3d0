"""Image and mask reading/writing with exact geometry: NIfTI, NRRD, MetaImage, DICOM and 2D PNG/JPEG/TIFF/BMP.

One reader per format: nibabel for NIfTI (:mod:`medseg.io.nifti`), SimpleITK for NRRD/MetaImage (converted from
LPS to RAS), pydicom + ITK for DICOM series (see :mod:`medseg.io.dicom`), and :mod:`medseg.io.raster` for 2D images
(PNG, JPEG, TIFF, BMP and single ``.dcm`` files). Every header is checked first by :func:`medseg.io.read_header`
(pixels in the file itself, byte counts that match the claim, finite non-singular geometry). Everything returns
the medseg image contract: a float32 ``MetaTensor`` ``(C, X, Y, Z)`` with a RAS ``.affine`` (see
:mod:`medseg.io.geometry`); a 2D image is a volume of one slice, ``(C, X, Y, 1)``. Writers are atomic: they write
into a temporary folder next to the target and move the result into place with ``os.replace``. 2D masks can be
written as PNG or TIFF; NIfTI, NRRD and MetaImage hold masks of any shape.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io.archive import ZipLimits, safe_extract_zip
from medseg.io.checks import ImageHeader, NonFinite, check_nonfinite_mode
from medseg.io.dicom import read_dicom_series
from medseg.io.geometry import (
    affine_to_sitk,
    as_numpy_affine,
    check_affine,
    sitk_to_affine,
    spacing_from_affine,
    to_metatensor,
)
from medseg.io.header import FORMATS, IMAGE_SUFFIXES, image_suffix, read_header
from medseg.io.modality import find_adapter
from medseg.io.nifti import read_nifti
from medseg.io.raster import (
    DICOM_SUFFIXES,
    RASTER_WRITE_SUFFIXES,
    read_dicom_image,
    read_raster,
    unreadable_file_error,
    write_atomic,
    write_raster,
)

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "WRITE_SUFFIXES", "load_channels", "load_image", "save_image", "save_mask"]

_FORMATS = {k: v for k, v in FORMATS.items() if k != ".hdr"}  # formats written (a NIfTI pair is only read)
#: Suffixes ``save_mask`` writes; ``save_image`` writes all but the 2D ones (``.png``, ``.tif``, ``.tiff``).
WRITE_SUFFIXES: tuple[str, ...] = (*_FORMATS, *RASTER_WRITE_SUFFIXES)
_SITK_IO = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}
_suffix = image_suffix


def _read_sitk(path: Path, header: ImageHeader) -> MetaTensor:
    fmt = header.format
    try:
        img = sitk.ReadImage(str(path), imageIO=_SITK_IO[fmt])
        arr = sitk.GetArrayFromImage(img)
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK trace
        raise unreadable_file_error(path, "NRRD" if fmt == "nrrd" else "MetaImage", exc) from exc
    dim = img.GetDimension()
    if dim not in (2, 3) or np.iscomplexobj(arr):
        raise DataError(
            f"{path.name} is a {dim}D {img.GetPixelIDTypeAsString()} image",
            expected="a 2D or 3D image of real scalars or vectors",
            path=path,
        )
    if arr.size != header.voxels:
        raise DataError(
            f"{path.name} decoded to {arr.size} values",
            expected=f"{header.voxels} values, as its header claims (shape {header.shape} x {header.channels})",
            hint="the header is inconsistent; re-export the image",
            path=path,
        )
    if dim == 2:
        arr = arr[None]
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    data = np.transpose(arr, (3, 2, 1, 0))  # SimpleITK (z, y, x, c) -> (c, x, y, z)
    affine = check_affine(sitk_to_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection()), path.name)
    return to_metatensor(data, affine, {"filename_or_obj": str(path), "source_format": fmt})


def _finite(image: MetaTensor, nonfinite: NonFinite, name: str) -> MetaTensor:
    """Refuse (or, with ``nonfinite="zero"``, zero) NaN and infinite voxel values."""
    bad = ~torch.isfinite(image.as_tensor())
    count = int(bad.sum())
    if count == 0:
        return image
    if nonfinite == "error":
        raise DataError(
            f"{name} holds {count} non-finite voxel values (NaN or infinity) of {image.numel()}",
            expected="finite voxel values",
            hint='fix the image, or pass nonfinite="zero" to replace them with 0',
            path=name,
        )
    logger.warning("%s: replaced %d non-finite voxel values with 0", name, count)
    image.as_tensor()[bad] = 0.0
    return image


def load_image(
    path: str | Path,
    *,
    series_uid: str | None = None,
    zip_limits: ZipLimits | None = None,
    allow_external_data: bool = False,
    max_voxels: int | None = None,
    nonfinite: NonFinite = "error",
    modality_options: dict[str, Any] | None = None,
) -> MetaTensor:
    """Load an image with its geometry, refusing files whose header lies.

    Supported: NIfTI (``.nii``, ``.nii.gz``; a ``.hdr``/``.img`` pair with ``allow_external_data``), NRRD
    (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), a folder of DICOM files (searched recursively), a
    ``.zip`` of DICOM files (extracted safely into a temporary folder that is removed afterwards), and 2D images:
    PNG, JPEG, TIFF, BMP (``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``, ``.bmp``) and a single-frame DICOM
    file (``.dcm``). For the DICOM series rule and geometry checks see :func:`medseg.io.dicom.read_dicom_series`; for
    2D images (channels, pixel size) see :mod:`medseg.io.raster`.

    Every header is checked before its pixels are decoded (:func:`medseg.io.read_header`): the pixels must be in the
    file itself (unless ``allow_external_data``), their byte count must match what the header implies (a compressed
    stream is decompressed one byte past the claim at most), and spacing, origin and direction must be finite,
    positive and non-singular. Decoded voxel values must be finite.

    Args:
        path: image file, DICOM folder or DICOM zip.
        series_uid: DICOM folder or zip only: the SeriesInstanceUID to read (default: the largest image series).
        zip_limits: limits for zip extraction (``ZipLimits()`` if None).
        allow_external_data: read a detached ``.nhdr``/``.mhd`` or a NIfTI ``.hdr``/``.img`` pair whose data file
            is one regular file inside the header's folder. Off by default: a header that points elsewhere (another
            path, ``../``, a device, a file list) is refused. For local files only; never for uploads.
        max_voxels: refuse an image whose header claims more voxels (times channels) than this, before decoding
            (None: no cap).
        nonfinite: ``"error"`` (default) refuses NaN/Inf voxel values; ``"zero"`` replaces them with 0 (logged).
        modality_options: keyword options of the modality adapter that reads a single ``.dcm`` file
            (:mod:`medseg.io.modality`: X-ray angiography ``derive``, ``subtract`` ...; ultrasound ``crop``,
            ``colour`` ...; see ``docs/modalities.md``). X-ray angiography (XA/XRF) and ultrasound files, and DICOM
            folders whose series is one such multi-frame file, are read by their adapter: ``(C, X, Y, T)`` with
            T = frame, meta ``modality_adapter``.

    Returns:
        ``MetaTensor`` ``(C, X, Y, Z)`` float32 (a 3D scalar image has C=1; a 4D NIfTI ``(X, Y, Z, C)`` has C
        channels; a 2D image is ``(C, X, Y, 1)`` with X = column, Y = row, C=1 grey or C=3 colour).
        ``.affine`` is the float64 ``(4, 4)`` voxel-to-RAS-mm matrix; ``.meta`` holds ``filename_or_obj``,
        ``original_affine``, ``spatial_shape``, ``space="RAS"`` and ``source_format`` (one of "nifti", "nrrd",
        "metaimage", "dicom", "raster"; DICOM adds ``series_uid``, ``study_uid``, ``modality``).

    Raises:
        DataError: missing path, unsupported suffix, unreadable or corrupt file, a header that lies (external data,
            sizes that do not match the bytes present, refused geometry), more than ``max_voxels`` voxels,
            non-finite voxel values, a multi-page or multi-frame 2D file.
        ConfigError: ``series_uid`` given for a file other than a DICOM zip, or an unknown ``nonfinite``.

    Examples::

        >>> img = load_image("case001.nii.gz")
        >>> img.shape, img.affine.shape
        (torch.Size([1, 256, 256, 120]), torch.Size([4, 4]))
        >>> load_image("lesion_01.png").shape
        torch.Size([3, 600, 450, 1])
    """
    check_nonfinite_mode(nonfinite)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} not found", expected="an existing image file or DICOM folder", path=p)
    if p.is_dir():
        image = read_dicom_series(p, series_uid=series_uid, max_voxels=max_voxels)
    elif _suffix(p) == ".zip":
        with tempfile.TemporaryDirectory(prefix="medseg-zip-") as tmp:
            folder = safe_extract_zip(p, tmp, zip_limits)
            try:
                image = read_dicom_series(folder, series_uid=series_uid, display_name=str(p), max_voxels=max_voxels)
            except DataError as err:  # name the zip, not the temporary folder
                what = err.what.replace(str(folder), p.name)
                raise DataError(what, expected=err.expected, hint=err.hint, path=p) from err
    else:
        header = read_header(p, allow_external_data=allow_external_data, max_voxels=max_voxels, series_uid=series_uid)
        if header.format == "nifti":
            image = read_nifti(p, header)
        elif header.format in _SITK_IO:
            image = _read_sitk(p, header)
        elif _suffix(p) in DICOM_SUFFIXES and (adapter := find_adapter(p)) is not None:
            image = adapter.load(p, max_voxels=max_voxels, **(modality_options or {}))
        elif _suffix(p) in DICOM_SUFFIXES:
            image = read_dicom_image(p)
        else:
            image = read_raster(p)
    if modality_options and "modality_adapter" not in image.meta:
        raise ConfigError(
            f"modality_options given for {p.name}, which no modality adapter reads",
            expected="modality_options only for X-ray angiography or ultrasound .dcm files",
            path=p,
        )
    return _finite(image, nonfinite, p.name)


def load_channels(paths: Sequence[str | Path], **options: Any) -> MetaTensor:
    """Load one single-channel file per channel and stack them (e.g. BraTS T1/T1ce/T2/FLAIR).

    Args:
        paths: one image file per channel, in channel order.
        **options: keyword options of :func:`load_image` (``allow_external_data``, ``max_voxels``, ``nonfinite``).

    Returns:
        ``MetaTensor`` ``(C, X, Y, Z)`` with C = ``len(paths)``; affine and meta from the first file, plus
        ``channel_files`` (list of str).

    Raises:
        DataError: no paths, a file with more than one channel, or files whose shape or affine differ (atol 1e-4).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise DataError("no channel files given", expected="at least one image path")
    images = [load_image(p, **options) for p in files]
    first = images[0]
    first_affine = as_numpy_affine(first.affine)
    for p, img in zip(files, images, strict=True):
        if img.shape[0] != 1:
            raise DataError(f"{p.name} has {img.shape[0]} channels", expected="one channel per file", path=p)
        affine = as_numpy_affine(img.affine)
        if img.shape != first.shape or not np.allclose(affine, first_affine, rtol=0.0, atol=1e-4):
            diff = float(np.max(np.abs(affine - first_affine)))
            raise DataError(
                f"{p.name} and {files[0].name} differ in geometry (shapes {tuple(img.shape[1:])} vs "
                f"{tuple(first.shape[1:])}, max affine difference {diff:.3g})",
                expected="identical shape and affine for every channel (atol 1e-4)",
                hint="resample the channels onto one grid first",
                path=p,
            )
    data = np.concatenate([img.numpy() for img in images], axis=0)
    meta = {k: v for k, v in first.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
    meta["channel_files"] = [str(p) for p in files]
    return to_metatensor(data, first_affine, meta)


def _output_format(path: Path, *, mask: bool) -> str:
    """The writer for ``path``'s suffix: a ``_FORMATS`` value, or ``"raster"`` (PNG/TIFF, masks only)."""
    suffix = _suffix(path)
    if suffix in RASTER_WRITE_SUFFIXES:
        if mask:
            return "raster"
        raise DataError(
            f"cannot write {path.name}: save_image writes volumes with their geometry",
            expected=f"one of {', '.join(_FORMATS)}",
            hint="PNG/TIFF are written for 2D masks by save_mask; write images as NIfTI",
            path=path,
        )
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        raise DataError(
            f"cannot write {path.name}: unsupported suffix {suffix or '(none)'}",
            expected=f"one of {', '.join(WRITE_SUFFIXES if mask else _FORMATS)}",
            path=path,
        )
    return fmt


def _write(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a channel-first ``(C, X, Y, Z)`` array with its RAS affine in the format named by the suffix."""
    fmt = _output_format(path, mask=False)
    affine = check_affine(affine, path.name)

    def write_nifti(tmp: Path) -> None:
        data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # NIfTI channels go last
        img = nib.Nifti1Image(data, affine, dtype=array.dtype)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp))

    def write_sitk(tmp: Path) -> None:
        if array.shape[0] == 1:
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array[0], (2, 1, 0))))
        else:
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (3, 2, 1, 0))), isVector=True)
        origin, spacing, direction = affine_to_sitk(affine)
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        sitk.WriteImage(img, str(tmp), useCompression=True)

    return write_atomic(path, write_nifti if fmt == "nifti" else write_sitk)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _label_array(mask: Any) -> np.ndarray:
    """Validate a label map and cast it to the smallest fitting integer type; returns ``(X, Y, Z)``.

    A 2D ``(X, Y)`` label map is taken as one slice ``(X, Y, 1)``.
    """
    arr = _to_numpy(mask)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ModelInputError(
            f"mask has shape {arr.shape}", expected="(X, Y, Z), (1, X, Y, Z) or 2D (X, Y) integer labels"
        )
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ModelInputError("mask has non-integer values", expected="integer labels", hint="argmax the logits")
    elif arr.dtype.kind not in "iu":
        raise ModelInputError(f"mask has dtype {arr.dtype}", expected="an integer label map")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return arr.astype(dtype)
    raise ModelInputError(f"mask labels span {lo}..{hi}", expected="labels that fit in int32")


def save_mask(mask: Any, reference: MetaTensor | str | Path, path: str | Path) -> Path:
    """Write a label map on the exact grid of its reference image.

    Args:
        mask: integer labels, numpy array or tensor ``(X, Y, Z)`` or ``(1, X, Y, Z)``; for a 2D reference also
            ``(X, Y)``.
        reference: the image the mask belongs to (a ``MetaTensor`` from :func:`load_image`, or its path).
        path: output file; the suffix picks the format: ``.nii``/``.nii.gz`` (nibabel, sform and qform code 1),
            ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` (SimpleITK, LPS origin/spacing/direction in double precision), or
            for a one-slice mask ``.png``/``.tif``/``.tiff`` (:func:`medseg.io.raster.write_raster`: rows = Y,
            columns = X; only the pixel size of the reference is stored, as the file's resolution).

    Returns:
        ``path`` as a ``Path``. Stored as uint8 when the labels fit, else uint16 or int32 (PNG/TIFF: uint8 or
        uint16). The write is atomic.

    Raises:
        ModelInputError: the mask's spatial shape differs from the reference's, or it is not an integer label map.
        DataError: unsupported suffix, unreadable reference file, a PNG/TIFF for a mask of more than one slice or
            with labels outside 0..65535, or the file cannot be written.
    """
    out = Path(path)
    fmt = _output_format(out, mask=True)
    if isinstance(reference, str | Path):
        reference = load_image(reference)
    if not isinstance(reference, MetaTensor):
        raise ModelInputError(
            f"reference for {out.name} is a {type(reference).__name__}",
            expected="a MetaTensor from load_image (or the reference image's path)",
        )
    ref = reference
    labels = _label_array(mask)
    ref_shape = tuple(int(s) for s in ref.shape[-3:])
    if labels.shape != ref_shape:
        raise ModelInputError(
            f"mask for {out.name} has spatial shape {labels.shape}",
            expected=f"the reference's spatial shape {ref_shape}",
            hint="invert resampling/cropping (e.g. Invertd) before saving",
        )
    affine = as_numpy_affine(ref.affine)
    if fmt != "raster":
        return _write(labels[None], affine, out)
    if labels.shape[2] != 1:
        raise DataError(
            f"mask for {out.name} has {labels.shape[2]} slices",
            expected=f"one slice (X, Y, 1) in a PNG/TIFF, or a volume file ({', '.join(_FORMATS)})",
            hint="PNG/TIFF hold one 2D slice; write NIfTI for volumes",
            path=out,
        )
    spacing = spacing_from_affine(affine)
    if not np.allclose(affine[:3, :3], np.diag(spacing), atol=1e-6) or np.any(affine[:3, 3] != 0):
        logger.warning(
            "%s: PNG/TIFF store the pixel size only; the reference's orientation and origin are not kept", out.name
        )
    return write_raster(labels, out, spacing=(float(spacing[0]), float(spacing[1])))


def save_image(image: MetaTensor, path: str | Path) -> Path:
    """Write a float image with its geometry (used e.g. to write generated datasets).

    Args:
        image: ``MetaTensor`` ``(C, X, Y, Z)`` or ``(X, Y, Z)`` with a RAS ``.affine``; C > 1 is written as a 4D
            NIfTI ``(X, Y, Z, C)`` or a vector NRRD/MetaImage.
        path: output file; a NIfTI, NRRD or MetaImage suffix as for :func:`save_mask` (PNG/TIFF hold masks only).

    Returns:
        ``path`` as a ``Path``; the data is stored as float32 and the write is atomic.

    Raises:
        ModelInputError: ``image`` has no affine or the wrong number of dimensions.
        DataError: unsupported suffix or the file cannot be written.
    """
    out = Path(path)
    _output_format(out, mask=False)
    affine = getattr(image, "affine", None)
    if affine is None:
        raise ModelInputError(f"image for {out.name} has no affine", expected="a MetaTensor with .affine")
    data = _to_numpy(image).astype(np.float32, copy=False)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ModelInputError(f"image for {out.name} has shape {data.shape}", expected="(C, X, Y, Z) or (X, Y, Z)")
    return _write(data, as_numpy_affine(affine), out)
