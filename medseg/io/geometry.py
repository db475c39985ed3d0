"""Voxel-to-world geometry: RAS/LPS conversion, SimpleITK parameters, and the MetaTensor contract.

Every image in medseg is a channel-first MONAI :class:`~monai.data.MetaTensor` of shape ``(C, X, Y, Z)`` whose
``.affine`` (4x4, float64) maps a voxel index ``(i, j, k, 1)`` to **RAS** world millimetres (the MONAI and
nibabel convention). ITK, SimpleITK, NRRD, MetaImage and DICOM describe the same mapping in **LPS**; the two
differ only by the sign of the first two world axes, i.e. ``A_ras = diag(-1, -1, 1, 1) @ A_lps``.

SimpleITK describes an image by ``origin`` (LPS world position of voxel 0), ``spacing`` (mm per voxel along each
array axis) and ``direction`` (3x3, row-major, column ``j`` is the unit world direction of array axis ``j``), so
``A_lps = [[direction * spacing, origin], [0, 0, 0, 1]]``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "LPS_RAS_FLIP",
    "affine_to_sitk",
    "as_numpy_affine",
    "check_affine",
    "lps_to_ras",
    "ras_to_lps",
    "same_geometry",
    "sitk_to_affine",
    "spacing_from_affine",
    "to_metatensor",
]

#: ``diag(-1, -1, 1, 1)``: converts an LPS affine to RAS and back (it is its own inverse).
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def as_numpy_affine(affine: Any) -> np.ndarray:
    """Return ``affine`` (numpy array, torch tensor or nested list) as a ``(4, 4)`` float64 numpy array."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    arr = np.asarray(affine, dtype=np.float64)
    if arr.shape != (4, 4):
        raise DataError(f"affine has shape {arr.shape}", expected="a 4x4 voxel-to-world matrix")
    return arr


def ras_to_lps(affine: Any) -> np.ndarray:
    """Convert a RAS affine ``(4, 4)`` to LPS by flipping the sign of its first two rows."""
    return LPS_RAS_FLIP @ as_numpy_affine(affine)


def lps_to_ras(affine: Any) -> np.ndarray:
    """Convert an LPS affine ``(4, 4)`` to RAS by flipping the sign of its first two rows."""
    return LPS_RAS_FLIP @ as_numpy_affine(affine)


def spacing_from_affine(affine: Any) -> np.ndarray:
    """Voxel spacing in mm along each array axis: the norms of the affine's first three columns, shape ``(3,)``."""
    return np.linalg.norm(as_numpy_affine(affine)[:3, :3], axis=0)


def check_affine(affine: Any, source: str) -> np.ndarray:
    """Return ``affine`` as float64 numpy, refusing non-finite or singular matrices.

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix.
        source: file or folder name used in the error message.

    Raises:
        DataError: the matrix has NaN/inf entries or a zero-volume voxel.
    """
    arr = as_numpy_affine(affine)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{source} has a non-finite voxel-to-world affine", expected="finite spacing/origin/direction")
    spacing = spacing_from_affine(arr)
    if np.any(spacing <= 0) or abs(np.linalg.det(arr[:3, :3])) <= 1e-12 * float(np.prod(spacing)):
        raise DataError(
            f"{source} has a degenerate voxel-to-world affine (spacing {spacing.tolist()})",
            expected="positive spacing and linearly independent axis directions",
        )
    return arr


def affine_to_sitk(affine: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Split a RAS affine into SimpleITK's LPS ``(origin, spacing, direction)``.

    Args:
        affine: ``(4, 4)`` RAS voxel-to-world matrix.

    Returns:
        ``origin`` (3 floats, LPS mm), ``spacing`` (3 floats, mm) and ``direction`` (9 floats, row-major 3x3 whose
        column ``j`` is the unit direction of array axis ``j``), ready for ``SetOrigin/SetSpacing/SetDirection``.
    """
    lps = ras_to_lps(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"affine has a zero-length axis (spacing {spacing.tolist()})", expected="positive spacing")
    direction = lps[:3, :3] / spacing[None, :]
    origin = lps[:3, 3]
    return (
        tuple(float(v) for v in origin),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.reshape(-1)),
    )


def sitk_to_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    """Build the RAS affine ``(4, 4)`` from SimpleITK's LPS ``origin``, ``spacing`` and row-major ``direction``.

    2D inputs (2 origin/spacing values, 4 direction values) are embedded in 3D with a unit third axis.
    """
    origin = np.asarray(origin, dtype=np.float64).reshape(-1)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    ndim = origin.size
    direction = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim)
    if ndim not in (2, 3) or spacing.size != ndim:
        raise DataError(f"image has {ndim} spatial dimensions", expected="a 2D or 3D image")
    lps = np.eye(4)
    lps[:ndim, :ndim] = direction * spacing[None, :]
    lps[:ndim, 3] = origin
    return lps_to_ras(lps)


def to_metatensor(array: np.ndarray, affine: Any, meta: dict[str, Any]) -> MetaTensor:
    """Wrap a channel-first array into the medseg image contract.

    Args:
        array: ``(C, X, Y, Z)`` voxel values; converted to float32.
        affine: ``(4, 4)`` RAS voxel-to-world matrix.
        meta: extra metadata (``filename_or_obj``, ``source_format``, ...); geometry keys are filled in here.

    Returns:
        ``MetaTensor`` ``(C, X, Y, Z)`` float32 with a float64 ``.affine`` and ``.meta`` holding ``original_affine``,
        ``spatial_shape``, ``space="RAS"`` and ``original_channel_dim=0`` (already channel-first).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf, refused by load_image
        data = np.ascontiguousarray(array, dtype=np.float32)
    if data.ndim != 4:
        raise DataError(f"image array has shape {data.shape}", expected="(C, X, Y, Z)")
    aff = as_numpy_affine(affine)
    full_meta = {k: v for k, v in meta.items() if k != "affine"}  # the affine travels as .affine only
    full_meta.update(
        original_affine=aff.copy(),
        spatial_shape=np.asarray(data.shape[1:], dtype=np.int64),
        space="RAS",
        original_channel_dim=0,
    )
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(aff, dtype=torch.float64), meta=full_meta)


def _geometry_of(obj: Any) -> tuple[tuple[int, ...], np.ndarray]:
    affine = getattr(obj, "affine", None)
    if affine is None:
        raise TypeError(f"expected an image with an .affine (MetaTensor), got {type(obj).__name__}")
    return tuple(int(s) for s in obj.shape[-3:]), as_numpy_affine(affine)


def same_geometry(a: Any, b: Any, atol: float = 1e-4) -> bool:
    """Whether two images share spatial shape and voxel-to-world affine.

    Args:
        a: image with ``.affine`` and a shape ending in ``(X, Y, Z)`` (e.g. a ``MetaTensor`` ``(C, X, Y, Z)``).
        b: same for the other image; channel counts may differ.
        atol: absolute tolerance on every affine entry (mm).

    Returns:
        True when the last three dimensions match and the affines agree within ``atol``.
    """
    shape_a, aff_a = _geometry_of(a)
    shape_b, aff_b = _geometry_of(b)
    return shape_a == shape_b and bool(np.allclose(aff_a, aff_b, rtol=0.0, atol=atol))
