"""Reading and writing images with exact geometry (``docs/architecture.md``, "Geometry").

Public API::

    load_image(path, *, series_uid=None, zip_limits=None, allow_external_data=False, max_voxels=None,
               nonfinite="error") -> MetaTensor (C, X, Y, Z), RAS affine
    read_header(path, *, allow_external_data=False, max_voxels=None) -> ImageHeader   (no pixel decoding)
    load_channels(paths) -> MetaTensor (C, X, Y, Z)
    save_mask(mask, reference, path) -> Path            (.png/.tif/.tiff for one-slice masks)
    save_image(image, path) -> Path
    same_geometry(a, b, atol=1e-4) -> bool
    read_raster(path) -> MetaTensor (C, X, Y, 1)        PNG/JPEG/TIFF/BMP, X = column, Y = row
    read_dicom_image(path) -> MetaTensor (C, X, Y, 1)   one single-frame .dcm file
    write_raster(mask, path, *, spacing=None) -> Path   2D label map as PNG/TIFF
    open_slide(path, *, mpp=None) -> Slide              whole-slide image, read by region (docs/histology.md)
    find_adapter(path) / get_adapter(name) -> ModalityAdapter | None   modality adapters (docs/modalities.md)
    load_xa(path, **options) -> MetaTensor (1, X, Y, T)                X-ray angiography, subtracted
    load_ultrasound(path, **options) -> MetaTensor (C, X, Y, T)        ultrasound, cropped to its region
"""

from __future__ import annotations

from medseg.io.archive import ZipLimits, safe_extract_zip
from medseg.io.checks import NONFINITE_MODES, ImageHeader, VoxelLimitError
from medseg.io.dicom import DicomSeries, list_dicom_series, read_dicom_series
from medseg.io.geometry import (
    affine_to_sitk,
    lps_to_ras,
    ras_to_lps,
    same_geometry,
    sitk_to_affine,
    spacing_from_affine,
)
from medseg.io.header import read_header
from medseg.io.images import IMAGE_SUFFIXES, WRITE_SUFFIXES, load_channels, load_image, save_image, save_mask
from medseg.io.modality import ModalityAdapter, find_adapter, get_adapter, list_adapters
from medseg.io.raster import RASTER_SUFFIXES, raster_channels, read_dicom_image, read_raster, write_raster
from medseg.io.slide import SLIDE_SUFFIXES, Slide, SlideLevel, open_slide
from medseg.io.slide_writer import write_pyramidal_tiff
from medseg.io.ultrasound import load_ultrasound  # registers the ultrasound adapter
from medseg.io.xa import load_xa  # registers the X-ray angiography adapter

__all__ = [
    "IMAGE_SUFFIXES",
    "NONFINITE_MODES",
    "RASTER_SUFFIXES",
    "SLIDE_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomSeries",
    "ImageHeader",
    "Slide",
    "SlideLevel",
    "ModalityAdapter",
    "VoxelLimitError",
    "ZipLimits",
    "affine_to_sitk",
    "find_adapter",
    "get_adapter",
    "list_adapters",
    "list_dicom_series",
    "load_channels",
    "load_image",
    "open_slide",
    "load_ultrasound",
    "load_xa",
    "lps_to_ras",
    "ras_to_lps",
    "raster_channels",
    "read_dicom_image",
    "read_dicom_series",
    "read_header",
    "read_raster",
    "safe_extract_zip",
    "same_geometry",
    "save_image",
    "save_mask",
    "sitk_to_affine",
    "spacing_from_affine",
    "write_pyramidal_tiff",
    "write_raster",
]
