"""Reading and writing images with exact geometry (DESIGN.md §3).

Public API::

    load_image(path, *, series_uid=None, zip_limits=None) -> MetaTensor (C, X, Y, Z), RAS affine
    load_channels(paths) -> MetaTensor (C, X, Y, Z)
    save_mask(mask, reference, path) -> Path
    save_image(image, path) -> Path
    same_geometry(a, b, atol=1e-4) -> bool
"""

from __future__ import annotations

from medseg.io.archive import ZipLimits, safe_extract_zip
from medseg.io.dicom import DicomSeries, list_dicom_series, read_dicom_series
from medseg.io.geometry import (
    affine_to_sitk,
    lps_to_ras,
    ras_to_lps,
    same_geometry,
    sitk_to_affine,
    spacing_from_affine,
)
from medseg.io.images import IMAGE_SUFFIXES, WRITE_SUFFIXES, load_channels, load_image, save_image, save_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomSeries",
    "ZipLimits",
    "affine_to_sitk",
    "list_dicom_series",
    "load_channels",
    "load_image",
    "lps_to_ras",
    "ras_to_lps",
    "read_dicom_series",
    "safe_extract_zip",
    "same_geometry",
    "save_image",
    "save_mask",
    "sitk_to_affine",
    "spacing_from_affine",
]
