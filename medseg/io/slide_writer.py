"""Writing slide-sized images: tiled, pyramidal OME-TIFF with the pixel size (see :mod:`medseg.io.slide`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.core.errors import ConfigError
from medseg.io.raster import write_atomic
from medseg.io.slide import _user_mpp

__all__ = ["write_pyramidal_tiff"]


def _reduce(image: np.ndarray, mode: Literal["nearest", "mean"]) -> np.ndarray:
    """Half-size copy: every second pixel (labels) or the mean of each 2x2 block, ignoring NaN (probabilities)."""
    if mode == "nearest":
        return np.ascontiguousarray(image[::2, ::2])
    rows, cols = image.shape[:2]
    pad = ((0, rows % 2), (0, cols % 2)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image.astype(np.float32), pad, constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, *image.shape[2:])
    with warnings.catch_warnings():  # an all-NaN block (no prediction there) stays NaN, as intended
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(blocks, axis=(1, 3)).astype(image.dtype)


def write_pyramidal_tiff(
    image: np.ndarray,
    path: str | Path,
    *,
    mpp: tuple[float, float],
    tile: int = 256,
    downsample: Literal["nearest", "mean"] = "nearest",
    name: str = "medseg",
) -> Path:
    """Write an image as a tiled, pyramidal OME-TIFF with its pixel size, atomically.

    Level 0 is ``image``; each further level (a SubIFD) halves the previous one until it fits in one tile. The pixel
    size is stored twice: OME ``PhysicalSizeX/Y`` in um and the TIFF resolution tags in pixels per centimetre, so
    QuPath, OpenSlide-based tools and :func:`open_slide` all read it.

    Args:
        image: ``(rows, cols)`` labels or probabilities, or ``(rows, cols, 3)`` uint8 RGB.
        path: output file (``.ome.tif`` by convention).
        mpp: microns per pixel ``(x, y)`` of ``image``.
        tile: tile side in pixels (multiple of 16).
        downsample: ``"nearest"`` for label maps, ``"mean"`` for probabilities (NaN is ignored).
        name: image name stored in the OME metadata.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: invalid ``mpp`` or ``tile``, or an image that is not 2D / RGB.
        DataError: the file cannot be written.
    """
    import tifffile

    out = Path(path)
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ConfigError(f"image of shape {arr.shape} cannot be written as a slide", expected="(rows, cols[, 3])")
    if tile < 16 or tile % 16:
        raise ConfigError(f"tile={tile} is invalid", expected="a positive multiple of 16")
    mx, my = _user_mpp(mpp) or (0.0, 0.0)
    levels = [arr]
    while max(levels[-1].shape[:2]) > tile:
        levels.append(_reduce(levels[-1], downsample))
    rgb = arr.ndim == 3
    metadata = {
        "axes": "YXS" if rgb else "YX",
        "Name": name,
        "PhysicalSizeX": mx,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": my,
        "PhysicalSizeYUnit": "µm",
    }

    def write(tmp: Path) -> None:
        bigtiff = sum(level.nbytes for level in levels) > 2**31 - 2**26
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
            for i, level in enumerate(levels):
                sx, sy = arr.shape[1] / level.shape[1], arr.shape[0] / level.shape[0]
                tif.write(
                    level,
                    subifds=len(levels) - 1 if i == 0 else None,
                    subfiletype=0 if i == 0 else 1,
                    tile=(tile, tile),
                    compression="zlib",
                    photometric="rgb" if rgb else "minisblack",
                    resolution=(1e4 / (mx * sx), 1e4 / (my * sy)),
                    resolutionunit="CENTIMETER",
                    metadata=metadata if i == 0 else None,
                )

    return write_atomic(out, write)
