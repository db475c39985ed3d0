"""Histology: tissue detection, tiling at a target resolution and stain normalisation for whole-slide images.

The pieces a slide goes through before a tile model sees it (see ``docs/histology.md``):

1. :func:`detect_tissue` finds tissue on a thumbnail: Otsu's threshold on the HSV saturation (stained tissue is
   coloured, glass and background are grey or white), never below ``min_saturation`` so that a blank slide's noise
   does not count, then small specks removed and small holes filled (sizes in um^2).
2. :func:`make_tile_grid` lays a grid of square tiles at a target microns per pixel with overlap over the slide and
   keeps the tiles whose tissue share reaches ``min_tissue``. Tiles are read from the coarsest level at least as
   fine as the target and scaled to ``tile_size`` when that level is not within ``mpp_rtol`` of the target.
3. :func:`iter_tile_batches` reads the kept tiles in batches ``(B, 3, H, W)`` float32 in [0, 1], so memory is
   bounded by the batch, optionally through a :class:`StainNormalizer`.
4. :class:`StainNormalizer` maps a tile's colours onto a reference tile's: Macenko (MONAI's ``ExtractHEStains`` /
   ``NormalizeHEStains``, with the reference's own maximum stain concentrations) or Reinhard (in CIELAB through
   scikit-image; MONAI has no Reinhard).

MONAI's ``ForegroundMask(hsv_threshold={"S": "otsu"})`` applies the same threshold but has no floor for blank slides
and no clean-up, and ``GridPatch`` tiles an array in memory rather than a pyramid on disk; both are therefore done
here. Slide-level outputs from tile predictions live in :mod:`medseg.data.histology_outputs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io.slide import Slide

logger = logging.getLogger(__name__)

__all__ = [
    "STAIN_METHODS",
    "StainNormalizer",
    "TileBatch",
    "TileGrid",
    "TissueMask",
    "detect_tissue",
    "iter_tile_batches",
    "make_tile_grid",
    "read_tile",
]

STAIN_METHODS: tuple[str, ...] = ("macenko", "reinhard")


# --------------------------------------------------------------------------------------------------- tissue


@dataclass(frozen=True)
class TissueMask:
    """Tissue found on a slide's thumbnail.

    Attributes:
        mask: ``(rows, cols)`` bool, True on tissue.
        downsample: level-0 pixels per mask pixel ``(x, y)``.
        threshold: the saturation threshold applied (0-1).
        fraction: share of the mask that is tissue.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    threshold: float
    fraction: float

    def box_fractions(self, x0: np.ndarray, y0: np.ndarray, w0: float, h0: float) -> np.ndarray:
        """Tissue share of level-0 boxes ``[x0, x0 + w0) x [y0, y0 + h0)`` (outside the slide counts as no tissue).

        Computed on the mask with a summed-area table, so any number of boxes costs one pass over the mask.
        """
        rows, cols = self.mask.shape
        table = np.zeros((rows + 1, cols + 1), dtype=np.int64)
        table[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1)
        dx, dy = self.downsample
        c0 = np.clip(np.floor(np.asarray(x0) / dx), 0, cols).astype(np.int64)
        c1 = np.clip(np.ceil((np.asarray(x0) + w0) / dx), 0, cols).astype(np.int64)
        r0 = np.clip(np.floor(np.asarray(y0) / dy), 0, rows).astype(np.int64)
        r1 = np.clip(np.ceil((np.asarray(y0) + h0) / dy), 0, rows).astype(np.int64)
        inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
        area = max(1.0, (w0 / dx) * (h0 / dy))
        return np.clip(inside / area, 0.0, 1.0).astype(np.float32)


def detect_tissue(
    slide: Slide,
    *,
    max_side: int = 2048,
    min_saturation: float = 0.07,
    min_object_um2: float = 5000.0,
    max_hole_um2: float = 5000.0,
) -> TissueMask:
    """Find tissue on a thumbnail of the slide: Otsu on HSV saturation, specks removed, holes filled.

    Args:
        slide: an open slide.
        max_side: thumbnail size the mask is computed on (longer side, pixels).
        min_saturation: floor of the threshold (0-1); a slide whose saturation never exceeds it has no tissue.
        min_object_um2: tissue pieces smaller than this area are dropped (dust, debris).
        max_hole_um2: holes in tissue up to this area are filled (nuclei-free gaps, lumina of small vessels).

    Returns:
        The :class:`TissueMask` (``threshold = max(otsu, min_saturation)``).

    Raises:
        DataError: no tissue on the slide.
        ConfigError: invalid sizes or thresholds.
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    if not 0.0 <= min_saturation < 1.0:
        raise ConfigError(f"min_saturation={min_saturation} is invalid", expected="a value in [0, 1)")
    if min_object_um2 < 0 or max_hole_um2 < 0:
        raise ConfigError("tissue clean-up areas must be >= 0", expected="areas in um^2 >= 0")
    thumb = slide.thumbnail(max_side)
    rows, cols = thumb.shape[:2]
    w0, h0 = slide.dimensions
    downsample = (w0 / cols, h0 / rows)
    saturation = rgb2hsv(thumb)[..., 1]
    spread = float(saturation.max() - saturation.min())
    otsu = float(threshold_otsu(saturation)) if spread > 1e-6 else float(saturation.max())
    threshold = max(otsu, min_saturation)
    mask = saturation > threshold
    pixel_um2 = slide.mpp[0] * downsample[0] * slide.mpp[1] * downsample[1]
    if min_object_um2 > 0 and mask.any():
        mask = remove_small_objects(mask, max_size=max(0, int(min_object_um2 / pixel_um2)))
    if max_hole_um2 > 0 and mask.any():
        mask = remove_small_holes(mask, max_size=max(0, int(max_hole_um2 / pixel_um2)))
    fraction = float(mask.mean())
    if not mask.any():
        raise DataError(
            f"no tissue found on {slide.path.name} (HSV saturation at most {float(saturation.max()):.3f}, "
            f"threshold {threshold:.3f})",
            expected="stained tissue: pixels more saturated than the threshold, in pieces larger than "
            f"{min_object_um2:g} um^2",
            hint="check that the slide holds tissue; for faint stains lower min_saturation, or tile without a "
            "tissue filter (min_tissue=0)",
            path=slide.path,
        )
    logger.debug(
        "%s: tissue threshold %.3f (otsu %.3f), %.1f %% tissue", slide.path.name, threshold, otsu, 100 * fraction
    )
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold, fraction=fraction)


# --------------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class TileGrid:
    """Square tiles over a slide at a target resolution; only the kept (tissue) tiles are listed.

    Tile ``i`` covers level pixels ``[lx, lx + read_size) x [ly, ly + read_size)`` of ``level``, with
    ``(lx, ly) = level_xy[i]``; its level-0 corner is ``coords[i]``. The grid reaches the right and bottom edges,
    so the last row and column may extend past the slide (read as white).

    Attributes:
        level: the pyramid level tiles are read from.
        tile_size: tile side in pixels handed to the model.
        read_size: tile side in pixels of ``level`` (``tile_size`` unless the level is rescaled).
        stride: distance between tile corners in pixels of ``level``.
        target_mpp: the resolution asked for.
        mpp: microns per pixel of the tiles handed to the model ``(x, y)``.
        level_size: ``(width, height)`` of ``level``.
        level_downsample: level-0 pixels per level pixel ``(x, y)``.
        shape: ``(rows, cols)`` of the full grid.
        indices: ``(N, 2)`` int64 ``(row, col)`` of the kept tiles.
        coords: ``(N, 2)`` int64 level-0 ``(x, y)`` of the kept tiles' top-left corners.
        tissue: ``(N,)`` float32 tissue share of each kept tile (NaN without a tissue mask).
    """

    level: int
    tile_size: int
    read_size: int
    stride: int
    target_mpp: float
    mpp: tuple[float, float]
    level_size: tuple[int, int]
    level_downsample: tuple[float, float]
    shape: tuple[int, int]
    indices: np.ndarray
    coords: np.ndarray
    tissue: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def total(self) -> int:
        """Tiles in the full grid, kept or not."""
        return self.shape[0] * self.shape[1]

    @property
    def level_xy(self) -> np.ndarray:
        """``(N, 2)`` int64 ``(x, y)`` corners in pixels of :attr:`level`."""
        return self.indices[:, ::-1] * self.stride


def _grid_steps(length: int, size: int, stride: int) -> int:
    return max(1, math.ceil(max(0, length - size) / stride) + 1)


def make_tile_grid(
    slide: Slide,
    *,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    overlap: float = 0.0,
    tissue: TissueMask | None = None,
    min_tissue: float = 0.25,
    mpp_rtol: float = 0.1,
) -> TileGrid:
    """Lay tiles over a slide at ``target_mpp`` and keep those with enough tissue.

    Args:
        slide: an open slide.
        target_mpp: microns per pixel of the tiles (0.5 ~ 20x, 0.25 ~ 40x).
        tile_size: tile side in pixels at ``target_mpp``.
        overlap: share of a tile that neighbours overlap, in [0, 1) (MONAI's sliding-window convention).
        tissue: a mask from :func:`detect_tissue`; computed when None and ``min_tissue > 0``.
        min_tissue: smallest tissue share of a kept tile, in [0, 1]; 0 keeps every tile.
        mpp_rtol: a level within this relative distance of ``target_mpp`` is read without rescaling.

    Returns:
        The :class:`TileGrid`.

    Raises:
        ConfigError: invalid sizes, overlap, thresholds, or a target finer than the slide.
        DataError: no tissue on the slide (from :func:`detect_tissue`).
    """
    if not isinstance(tile_size, int) or tile_size < 8:
        raise ConfigError(f"tile_size={tile_size!r} is invalid", expected="an integer of at least 8 pixels")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be >= 0 and < 1, got {overlap}", expected="a share of the tile in [0, 1)")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}", expected="a tissue share in [0, 1]")
    level = slide.level_for_mpp(target_mpp, rtol=mpp_rtol)
    lv = slide.levels[level]
    if abs(lv.mpp / target_mpp - 1.0) <= mpp_rtol:
        read_size = tile_size
    else:
        read_size = max(1, round(tile_size * target_mpp / lv.mpp))
    stride = max(1, round((tile_size - round(tile_size * overlap)) * read_size / tile_size))
    cols = _grid_steps(lv.width, read_size, stride)
    rows = _grid_steps(lv.height, read_size, stride)
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    indices = np.stack([rr.ravel(), cc.ravel()], axis=1)
    w0, h0 = slide.dimensions
    ds = (w0 / lv.width, h0 / lv.height)
    coords = np.stack([np.round(cc.ravel() * stride * ds[0]), np.round(rr.ravel() * stride * ds[1])], axis=1)
    coords = coords.astype(np.int64)
    if tissue is None and min_tissue > 0:
        tissue = detect_tissue(slide)
    if tissue is not None:
        share = tissue.box_fractions(coords[:, 0], coords[:, 1], read_size * ds[0], read_size * ds[1])
    else:
        share = np.full(len(coords), np.nan, dtype=np.float32)
    keep = share >= min_tissue if min_tissue > 0 else np.ones(len(coords), dtype=bool)
    mpp = (lv.mpp_x * read_size / tile_size, lv.mpp_y * read_size / tile_size)
    grid = TileGrid(
        level=level,
        tile_size=tile_size,
        read_size=read_size,
        stride=stride,
        target_mpp=float(target_mpp),
        mpp=mpp,
        level_size=lv.dimensions,
        level_downsample=ds,
        shape=(rows, cols),
        indices=indices[keep],
        coords=coords[keep],
        tissue=share[keep],
    )
    logger.debug("%s: %d of %d tiles kept at level %d", slide.path.name, len(grid), grid.total, level)
    return grid


def read_tile(slide: Slide, grid: TileGrid, i: int) -> np.ndarray:
    """Tile ``i`` of ``grid`` as ``(tile_size, tile_size, 3)`` uint8 RGB (rescaled from the level if needed)."""
    from PIL import Image

    x, y = (int(v) for v in grid.coords[i])
    rgb = slide.read_region(grid.level, x, y, grid.read_size, grid.read_size)
    if grid.read_size != grid.tile_size:
        rgb = np.asarray(Image.fromarray(rgb).resize((grid.tile_size, grid.tile_size), Image.Resampling.BILINEAR))
    return rgb


@dataclass(frozen=True)
class TileBatch:
    """A batch of tiles.

    Attributes:
        tiles: ``(B, 3, H, W)`` float32 RGB in [0, 1].
        positions: ``(B,)`` int64 indices into the grid's kept tiles (``grid.coords[positions]``).
        coords: ``(B, 2)`` int64 level-0 ``(x, y)`` of the tiles' top-left corners.
    """

    tiles: torch.Tensor
    positions: np.ndarray
    coords: np.ndarray


def iter_tile_batches(
    slide: Slide, grid: TileGrid, *, batch_size: int = 16, normalizer: StainNormalizer | None = None
) -> Iterator[TileBatch]:
    """Read the grid's tiles in batches; only one batch is held in memory.

    Args:
        slide: the slide the grid was made for.
        grid: from :func:`make_tile_grid`.
        batch_size: tiles per batch (the last batch may be smaller).
        normalizer: a fitted :class:`StainNormalizer` applied to each tile, or None.

    Yields:
        :class:`TileBatch` with ``tiles`` ``(B, 3, tile_size, tile_size)`` float32 in [0, 1].
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid", expected="a positive integer")
    if normalizer is not None and not normalizer.fitted:
        raise ConfigError("the stain normaliser is not fitted", hint="call .fit(reference_rgb) first")
    for start in range(0, len(grid), batch_size):
        positions = np.arange(start, min(start + batch_size, len(grid)), dtype=np.int64)
        batch = np.empty((len(positions), grid.tile_size, grid.tile_size, 3), dtype=np.uint8)
        for j, i in enumerate(positions):
            rgb = read_tile(slide, grid, int(i))
            batch[j] = normalizer.transform(rgb) if normalizer is not None else rgb
        tiles = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        yield TileBatch(tiles=tiles, positions=positions, coords=grid.coords[positions])


# --------------------------------------------------------------------------------------------------- stain


class _Reinhard:
    """Reinhard's colour transfer in CIELAB (D65, scikit-image); a channel without spread keeps its spread."""

    def __init__(self, reference: np.ndarray) -> None:
        self.target_mean, self.target_std = self._stats(self._lab(reference))

    @staticmethod
    def _lab(rgb: np.ndarray) -> np.ndarray:
        from skimage.color import rgb2lab

        return np.asarray(rgb2lab(rgb.astype(np.float32) / 255.0), dtype=np.float32)

    @staticmethod
    def _stats(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = lab.reshape(-1, 3).astype(np.float64)
        return flat.mean(axis=0), flat.std(axis=0)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.color import lab2rgb

        lab = self._lab(rgb)
        mean, std = self._stats(lab)
        scale = np.where(std > 1e-6, self.target_std / np.maximum(std, 1e-6), 1.0)
        out = ((lab - mean) * scale + self.target_mean).astype(np.float32)
        return np.clip(np.round(lab2rgb(out) * 255.0), 0, 255).astype(np.uint8)


def _rgb_uint8(image: Any, what: str) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise ModelInputError(
            f"{what} has shape {arr.shape} and dtype {arr.dtype}",
            expected="an RGB image (H, W, 3) of uint8",
            hint="pass tiles as read by Slide.read_region, before conversion to tensors",
        )
    return arr


class StainNormalizer:
    """Map tiles' stain colours onto those of a reference tile (deterministic: no random sampling).

    Methods:

    * ``"macenko"``: Macenko et al. 2009 (https://doi.org/10.1109/ISBI.2009.5193250) via MONAI's
      ``ExtractHEStains`` / ``NormalizeHEStains``: the reference's H&E stain vectors and its 99th-percentile stain
      concentrations are the target. A tile without stained pixels (absorbance below ``beta`` everywhere) is
      returned unchanged.
    * ``"reinhard"``: Reinhard et al. 2001 (https://doi.org/10.1109/38.946629) in CIELAB (D65, converted by
      scikit-image): each LAB channel of the tile is standardised and given the reference's mean and standard
      deviation (the usual Reinhard transfer, but a channel without spread, such as a grey tile's colour
      channels, is only shifted instead of divided by zero, and values are rounded rather than truncated).

    Args:
        method: ``"macenko"`` or ``"reinhard"``.
        tli: Macenko: transmitted light intensity (background brightness).
        alpha: Macenko: percentile for the robust extreme stain angles.
        beta: Macenko: optical-density threshold below which pixels count as background.

    Examples::

        >>> norm = StainNormalizer("reinhard").fit(reference_tile)  # (H, W, 3) uint8
        >>> out = norm.transform(tile)  # (H, W, 3) uint8
    """

    def __init__(
        self,
        method: Literal["macenko", "reinhard"] = "macenko",
        *,
        tli: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
    ) -> None:
        if method not in STAIN_METHODS:
            from medseg.core.registry import did_you_mean

            raise ConfigError(
                f"stain normalisation {method!r} is unknown",
                expected=f"one of {', '.join(STAIN_METHODS)}",
                hint=did_you_mean(str(method), list(STAIN_METHODS)) or None,
            )
        self.method = method
        self.tli, self.alpha, self.beta = float(tli), float(alpha), float(beta)
        self._impl: Any = None

    @property
    def fitted(self) -> bool:
        return self._impl is not None

    def fit(self, reference_rgb: Any) -> StainNormalizer:
        """Take the target colours from a reference tile ``(H, W, 3)`` uint8; returns ``self``.

        Raises:
            ModelInputError: the reference is not an RGB uint8 image.
            DataError: the reference holds no stain (Macenko) or is flat (Reinhard).
        """
        ref = _rgb_uint8(reference_rgb, "the reference tile")
        if self.method == "macenko":
            self._impl = self._fit_macenko(ref)
        else:
            self._impl = self._fit_reinhard(ref)
        return self

    def _fit_macenko(self, ref: np.ndarray) -> Any:
        from monai.apps.pathology.transforms import ExtractHEStains, NormalizeHEStains

        try:
            he = ExtractHEStains(tli=self.tli, alpha=self.alpha, beta=self.beta)(ref)
        except ValueError as exc:
            raise DataError(
                f"the reference tile holds no stain ({exc})",
                expected=f"a tile with stained tissue (optical density above beta={self.beta})",
                hint="pick a reference tile well inside the tissue",
            ) from exc
        absorbance = -np.log((ref.reshape(-1, 3).astype(np.float32) + 1.0).clip(max=self.tli) / self.tli)
        conc = np.linalg.lstsq(he, absorbance.T, rcond=None)[0]
        max_cref = np.percentile(conc, 99, axis=1).astype(np.float32)
        if not np.all(np.isfinite(max_cref)) or np.any(max_cref <= 0):
            raise DataError(
                "the reference tile's stain concentrations are not positive",
                expected="a tile with both haematoxylin and eosin",
                hint="pick a reference tile well inside H&E-stained tissue",
            )
        return NormalizeHEStains(tli=self.tli, alpha=self.alpha, beta=self.beta, target_he=he, max_cref=max_cref)

    def _fit_reinhard(self, ref: np.ndarray) -> Any:
        impl = _Reinhard(ref)
        if np.any(impl.target_std < 1e-6):
            raise DataError(
                "the reference tile has a flat colour channel",
                expected="a reference tile with tissue texture",
                hint="pick a reference tile well inside the tissue",
            )
        return impl

    def transform(self, tile: Any) -> np.ndarray:
        """Normalise one tile ``(H, W, 3)`` uint8 to ``(H, W, 3)`` uint8.

        Raises:
            ConfigError: :meth:`fit` was not called.
            ModelInputError: the tile is not an RGB uint8 image.
        """
        if self._impl is None:
            raise ConfigError("the stain normaliser is not fitted", hint="call .fit(reference_rgb) first")
        arr = _rgb_uint8(tile, "the tile")
        if self.method == "macenko":
            try:
                return np.asarray(self._impl(arr), dtype=np.uint8)
            except ValueError:  # no stained pixel: nothing to normalise
                return arr.copy()
        return self._impl(arr)

    __call__ = transform

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, fitted={self.fitted})"
