"""Whole-slide images: one :class:`Slide` over OpenSlide and tifffile, read region by region.

A whole-slide image is a pyramid of RGB levels; level 0 is the full resolution (often 10^9 pixels and more), so a
slide is never decoded whole: :meth:`Slide.read_region` reads a bounded window, :meth:`Slide.thumbnail` builds a small
overview from the coarsest level that is large enough, reading it in bounded blocks.

Backends (``backend="auto"`` picks by what opens):

* **OpenSlide** (``openslide-python`` with the ``openslide-bin`` library) for vendor formats: Aperio SVS, Hamamatsu
  NDPI/VMS, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF, Sakura SVSLIDE, and generic tiled TIFF.
* **tifffile** for pyramidal TIFF and OME-TIFF (pyramids in SubIFDs, which OpenSlide does not read). For a file both
  can open as a generic TIFF, the backend that sees more pyramid levels wins (OpenSlide on a tie).

Microns per pixel (level 0) come from the slide, in this order: OpenSlide's ``openslide.mpp-x/-y``; the Aperio
``MPP = ...`` field of the ImageDescription; OME ``PhysicalSizeX/Y``; the TIFF ``XResolution``/``YResolution`` tags
with ``ResolutionUnit`` centimetre (or inch, when the result is a plausible microscope pixel, 0.01-20 um; 72 to
300 dpi screen and print defaults are not). A slide without any of them is refused unless the caller passes
``mpp=``, which also overrides the file's value (a warning names a disagreement above 1 %). Level ``l`` has
``mpp * level0_width / level_width`` per axis. Pyramidal OME-TIFF is written by :mod:`medseg.io.slide_writer`.

Coordinates follow OpenSlide: ``read_region(level, x, y, w, h)`` takes the top-left corner ``(x, y)`` in level-0
pixels and the size ``(w, h)`` in pixels of ``level``; the result is ``(h, w, 3)`` uint8 RGB. Parts of the window
outside the slide, and transparent pixels, are white (255), the colour of empty glass.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from medseg.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SLIDE_SUFFIXES",
    "MissingMppError",
    "Slide",
    "SlideLevel",
    "is_slide_file",
    "open_slide",
]

#: Suffixes of whole-slide formats :func:`open_slide` reads.
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".tif", ".tiff",
)  # fmt: skip
#: Suffixes that always name a whole-slide image (``.tif`` / ``.tiff`` are slides only when tiled pyramids).
VENDOR_SLIDE_SUFFIXES: tuple[str, ...] = tuple(s for s in SLIDE_SUFFIXES if s not in (".tif", ".tiff"))
#: A tiled single-level TIFF larger than this on a side is read as a slide, not as a 2D image.
SLIDE_MIN_SIDE = 8192
#: Largest window :meth:`Slide.read_region` decodes at once (64 Mpx, 192 MiB of RGB).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
SlideBackend = Literal["auto", "openslide", "tifffile"]

_FORMATS_EXPECTED = (
    "a whole-slide image OpenSlide reads (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, generic tiled TIFF) or a "
    "pyramidal / OME-TIFF"
)
_MPP_RANGE = (0.01, 1000.0)  # microns per pixel a slide could plausibly have
_INCH_MPP_RANGE = (0.01, 20.0)  # for resolution tags in inch, where editors write 72-300 dpi placeholders
_AperioMPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_TILE_CACHE = 128  # decoded TIFF segments kept per slide (neighbouring and overlapping windows share them)


@dataclass(frozen=True)
class SlideLevel:
    """One pyramid level.

    Attributes:
        index: level number (0 = full resolution).
        width: width in pixels.
        height: height in pixels.
        downsample: level-0 pixels per pixel of this level (mean of both axes).
        mpp_x: microns per pixel along x (columns).
        mpp_y: microns per pixel along y (rows).
    """

    index: int
    width: int
    height: int
    downsample: float
    mpp_x: float
    mpp_y: float

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.width, self.height

    @property
    def mpp(self) -> float:
        """Mean microns per pixel of both axes."""
        return 0.5 * (self.mpp_x + self.mpp_y)


class _Reader(Protocol):
    name: str

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB at ``level``; ``(x, y)`` in that level's pixels; outside the level is white."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------- mpp


def _plausible(value: float | None, bounds: tuple[float, float] = _MPP_RANGE) -> float | None:
    if value is None or not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        return None
    return float(value)


def _pair(x: float | None, y: float | None, bounds: tuple[float, float] = _MPP_RANGE) -> tuple[float, float] | None:
    px, py = _plausible(x, bounds), _plausible(y, bounds)
    if px is None and py is None:
        return None
    return (px or py or 0.0), (py or px or 0.0)


def _float(value: Any) -> float | None:
    try:
        if isinstance(value, tuple | list) and len(value) == 2:
            return float(value[0]) / float(value[1]) if float(value[1]) else None
        return float(value)
    except (TypeError, ValueError):
        return None


def _mpp_from_resolution(x_res: float | None, y_res: float | None, unit: str) -> tuple[float, float] | None:
    """Microns per pixel from TIFF pixels-per-unit resolution values (``unit``: "centimeter" or "inch")."""
    if unit not in ("centimeter", "inch"):
        return None
    per_unit_um = 1e4 if unit == "centimeter" else 25400.0
    mx = per_unit_um / x_res if x_res else None
    my = per_unit_um / y_res if y_res else None
    return _pair(mx, my, _MPP_RANGE if unit == "centimeter" else _INCH_MPP_RANGE)


def _mpp_from_aperio(description: str) -> tuple[float, float] | None:
    match = _AperioMPP.search(description or "")
    value = _float(match.group(1)) if match else None
    return _pair(value, value)


def _mpp_from_properties(props: Mapping[str, str]) -> tuple[tuple[float, float], str] | None:
    """Microns per pixel from OpenSlide's properties, with the property it came from."""
    # for generic TIFF, OpenSlide turns any resolution tag into mpp, 72 dpi screen defaults included: apply the
    # resolution rule of the module docstring instead
    generic = props.get("openslide.vendor") == "generic-tiff"
    pair = None if generic else _pair(_float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y")))
    if pair:
        return pair, "openslide.mpp-x/y"
    pair = _pair(_float(props.get("aperio.MPP")), _float(props.get("aperio.MPP")))
    if pair:
        return pair, "aperio.MPP"
    unit = props.get("tiff.ResolutionUnit", "inch")
    pair = _mpp_from_resolution(_float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution")), unit)
    return (pair, "tiff resolution") if pair else None


def _mpp_from_ome(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        values = []
        for axis in ("X", "Y"):
            size = _float(element.get(f"PhysicalSize{axis}"))
            scale = _OME_UNITS_UM.get(element.get(f"PhysicalSize{axis}Unit", "µm"))
            values.append(size * scale if size is not None and scale is not None else None)
        return _pair(values[0], values[1])
    return None


def _mpp_from_tiff(tif: Any) -> tuple[tuple[float, float], str] | None:
    page = tif.pages.first
    description = str(getattr(page, "description", "") or "")
    pair = _mpp_from_aperio(description)
    if pair:
        return pair, "aperio MPP"
    if tif.is_ome and tif.ome_metadata:
        pair = _mpp_from_ome(tif.ome_metadata)
        if pair:
            return pair, "OME PhysicalSizeX/Y"
    tags = page.tags
    x_tag, y_tag, unit_tag = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if x_tag is None or y_tag is None:
        return None
    unit = {2: "inch", 3: "centimeter"}.get(int(unit_tag.value) if unit_tag is not None else 2, "none")
    pair = _mpp_from_resolution(_float(x_tag.value), _float(y_tag.value), unit)
    return (pair, "tiff resolution") if pair else None


# --------------------------------------------------------------------------------------------------- readers


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 from RGBA (non-premultiplied), composited on white."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class _OpenSlideReader:
    name = "openslide"

    def __init__(self, osr: Any, path: Path) -> None:
        self._osr = osr
        self._path = path

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self._osr.level_downsamples[level]
        try:
            region = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise _unreadable(self._path, f"level {level} at ({x}, {y}) size {w}x{h}", exc) from exc
        return _to_rgb(np.asarray(region))

    def close(self) -> None:
        self._osr.close()


class _TiffReader:
    """Region reads from tifffile pages, decoding only the tiles or strips a window touches."""

    name = "tifffile"

    def __init__(self, tif: Any, pages: list[Any], path: Path) -> None:
        self._tif = tif
        self._pages = pages
        self._path = path
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self._pages[level]
        fh = self._tif.filehandle
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        try:
            if count:
                fh.seek(offset)
                data: bytes | None = fh.read(count)
                if data is None or len(data) != count:
                    raise EOFError(f"segment {index} ends past the end of the file")
            else:
                data = None
            seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # codec errors (ValueError, RuntimeError, imagecodecs errors), EOFError
            raise _unreadable(self._path, f"tile {index} of level {level}", exc) from exc
        if seg is None:  # an empty segment: nothing was scanned there
            seg = np.full(shape, 255, dtype=np.uint8)
        arr = _rgb_segment(np.asarray(seg).reshape(shape[1:]), self._path)
        self._cache[key] = arr
        if len(self._cache) > _TILE_CACHE:
            self._cache.popitem(last=False)
        return arr

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        width, height = int(page.imagewidth), int(page.imagelength)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            return out
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
        else:
            tw, th = width, int(page.rowsperstrip or height)
        across = -(-width // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                seg = self._segment(level, ty * across + tx)
                sy0, sx0 = ty * th, tx * tw
                ya, yb = max(y0, sy0), min(y1, sy0 + seg.shape[0], height)
                xa, xb = max(x0, sx0), min(x1, sx0 + seg.shape[1], width)
                if ya < yb and xa < xb:
                    out[ya - y : yb - y, xa - x : xb - x] = seg[ya - sy0 : yb - sy0, xa - sx0 : xb - sx0]
        return out

    def close(self) -> None:
        self._tif.close()


def _rgb_segment(seg: np.ndarray, path: Path) -> np.ndarray:
    """A decoded ``(rows, cols, samples)`` segment as RGB uint8 (grey is repeated, alpha composited on white)."""
    if seg.dtype != np.uint8:
        raise DataError(
            f"{path.name} stores {seg.dtype} pixels",
            expected="8-bit brightfield RGB (or grey) pixels",
            hint="fluorescence and 16-bit slides are not supported; convert to 8-bit RGB",
            path=path,
        )
    if seg.ndim == 2:
        seg = seg[..., None]
    samples = seg.shape[-1]
    if samples == 1:
        return np.repeat(seg, 3, axis=-1)
    if samples == 3:
        return seg
    if samples == 4:
        return _to_rgb(seg)
    raise DataError(f"{path.name} has {samples} samples per pixel", expected="RGB, RGBA or grey pixels", path=path)


def _unreadable(path: Path, where: str, exc: BaseException) -> DataError:
    detail = " ".join(str(exc).split())[:300]
    return DataError(
        f"cannot read {where} of {path.name} ({type(exc).__name__}: {detail})",
        expected="a complete slide whose tiles decode",
        hint="the file may be truncated or corrupt; copy or export the slide again",
        path=path,
    )


def _check_segments(tif: Any, pages: list[Any], path: Path) -> None:
    """Refuse a TIFF whose pyramid tiles point past the end of the file (a truncated copy)."""
    size = path.stat().st_size
    for level, page in enumerate(pages):
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0:
            raise DataError(f"level {level} of {path.name} has no pixel data", expected=_FORMATS_EXPECTED, path=path)
        ends = offsets + counts
        bad = np.flatnonzero(ends > size)
        if bad.size:
            raise DataError(
                f"{path.name} is truncated: {bad.size} of {ends.size} tiles of level {level} end past the file's "
                f"{size} bytes (up to byte {int(ends.max())})",
                expected="a complete slide file",
                hint="the copy or download was cut short; copy the slide again",
                path=path,
            )


def _tiff_pyramid(tif: Any, path: Path) -> list[Any]:
    """The pages of the main pyramid of a TIFF (series 0 and its reduced levels), checked for sane sizes."""
    if not tif.series:
        raise DataError(f"{path.name} holds no image series", expected=_FORMATS_EXPECTED, path=path)
    series = tif.series[0]
    pages: list[Any] = []
    for level in series.levels:
        page = level.keyframe
        axes = str(level.axes)
        if set(axes) - {"Y", "X", "S"} or int(page.planarconfig) != 1 and int(page.samplesperpixel) > 1:
            raise DataError(
                f"{path.name}: level {len(pages)} has axes {axes} (shape {tuple(level.shape)})",
                expected="one 2D RGB or grey image per pyramid level, samples interleaved",
                hint="multi-channel, z-stack and time-series TIFFs are not whole-slide images medseg reads",
                path=path,
            )
        pages.append(page)
    widths = [int(p.imagewidth) for p in pages]
    heights = [int(p.imagelength) for p in pages]
    if any(w2 > w1 or h2 > h1 for w1, w2, h1, h2 in zip(widths, widths[1:], heights, heights[1:], strict=False)):
        raise DataError(
            f"{path.name} has pyramid levels that grow ({list(zip(widths, heights, strict=True))})",
            expected="levels from the largest to the smallest",
            path=path,
        )
    return pages


# --------------------------------------------------------------------------------------------------- slide


class Slide:
    """An open whole-slide image (use :func:`open_slide`); close it, or use it as a context manager.

    Attributes:
        path: the slide file.
        backend: ``"openslide"`` or ``"tifffile"``.
        vendor: OpenSlide's vendor name (``"aperio"``, ``"hamamatsu"``, ``"generic-tiff"``...) or ``"tiff"``.
        levels: the pyramid, level 0 first.
        mpp_source: where the microns per pixel came from (``"user"``, ``"openslide.mpp-x/y"``, ``"aperio MPP"``...).
        max_pixels: the largest window :meth:`read_region` decodes.
        properties: the slide's metadata as strings (OpenSlide properties, or TIFF tags for tifffile).
    """

    def __init__(
        self,
        path: Path,
        reader: _Reader,
        levels: tuple[SlideLevel, ...],
        *,
        vendor: str,
        mpp_source: str,
        properties: Mapping[str, str],
        max_pixels: int,
    ) -> None:
        self.path = path
        self._reader = reader
        self.levels = levels
        self.vendor = vendor
        self.mpp_source = mpp_source
        self.properties = dict(properties)
        self.max_pixels = max_pixels

    @property
    def backend(self) -> str:
        """The library reading the pixels."""
        return self._reader.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.levels[0].dimensions

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 microns per pixel ``(x, y)``."""
        return self.levels[0].mpp_x, self.levels[0].mpp_y

    @property
    def level_count(self) -> int:
        return len(self.levels)

    def _level(self, level: int) -> SlideLevel:
        if not isinstance(level, int | np.integer) or not 0 <= int(level) < len(self.levels):
            raise ConfigError(
                f"level {level!r} does not exist in {self.path.name}",
                expected=f"an integer from 0 to {len(self.levels) - 1}",
            )
        return self.levels[int(level)]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a window of one level.

        Args:
            level: pyramid level.
            x: left edge in level-0 pixels (OpenSlide's convention).
            y: top edge in level-0 pixels.
            w: width in pixels of ``level``.
            h: height in pixels of ``level``.

        Returns:
            ``(h, w, 3)`` uint8 RGB; the part of the window outside the slide is white.

        Raises:
            ConfigError: unknown level, a non-positive size, more than :attr:`max_pixels` pixels, or a window
                entirely outside the slide.
            DataError: a tile of the window cannot be read (truncated or corrupt file).
        """
        lv = self._level(level)
        x, y, w, h = (int(v) for v in (x, y, w, h))
        if w <= 0 or h <= 0:
            raise ConfigError(f"region size {w}x{h} is empty", expected="a width and height of at least 1 pixel")
        if w * h > self.max_pixels:
            raise ConfigError(
                f"region {w}x{h} at level {lv.index} of {self.path.name} has {w * h} pixels",
                expected=f"at most {self.max_pixels} pixels per read",
                hint="read tiles, a coarser level, or open the slide with a larger max_pixels",
            )
        lx, ly = round(x * lv.width / self.levels[0].width), round(y * lv.height / self.levels[0].height)
        if lx >= lv.width or ly >= lv.height or lx + w <= 0 or ly + h <= 0:
            raise ConfigError(
                f"region ({x}, {y}) size {w}x{h} at level {lv.index} lies outside {self.path.name}",
                expected=f"a window overlapping the slide's {self.dimensions[0]}x{self.dimensions[1]} level-0 pixels",
            )
        return self._reader.read(lv.index, lx, ly, w, h)

    def level_for_mpp(self, target: float, *, rtol: float = 0.1) -> int:
        """The coarsest level that is at least as fine as ``target`` microns per pixel (within ``rtol``).

        Tiles at ``target`` are then read from that level and scaled down (not at all when it is within ``rtol``).

        Raises:
            ConfigError: ``target`` is not positive, or is finer than level 0 beyond ``rtol`` (upsampling adds no
                detail; use a slide scanned at higher magnification).
        """
        if not (isinstance(target, int | float) and math.isfinite(target) and target > 0):
            raise ConfigError(f"target mpp {target!r} is invalid", expected="a positive number of microns per pixel")
        fine_enough = [lv for lv in self.levels if lv.mpp <= target * (1.0 + rtol)]
        if not fine_enough:
            raise ConfigError(
                f"target {target} um/px is finer than level 0 of {self.path.name} ({self.levels[0].mpp:.4g} um/px)",
                expected=f"a target of at least {self.levels[0].mpp / (1.0 + rtol):.4g} um/px",
                hint="tile at the slide's own resolution or coarser",
            )
        return max(fine_enough, key=lambda lv: lv.mpp).index

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """An overview whose longer side is ``max_side`` pixels (never larger than level 0).

        Read from the coarsest level at least ``max_side`` pixels long, in blocks of at most :attr:`max_pixels`,
        each reduced by box averaging, so a slide without a pyramid still gets a thumbnail in bounded memory.

        Returns:
            ``(rows, cols, 3)`` uint8 RGB; level-0 pixels per thumbnail pixel are ``dimensions / (cols, rows)``.
        """
        from PIL import Image

        if not isinstance(max_side, int) or max_side < 1:
            raise ConfigError(f"thumbnail size {max_side!r} is invalid", expected="a positive integer")
        w0, h0 = self.dimensions
        scale = min(1.0, max_side / max(w0, h0))
        out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        large_enough = [lv for lv in self.levels if lv.width >= out_w and lv.height >= out_h]
        lv = min(large_enough, key=lambda v: v.width * v.height)
        factor = max(1, min(lv.width // out_w, lv.height // out_h))
        block = max(factor, int(math.sqrt(self.max_pixels)) // factor * factor)
        reduced_w, reduced_h = -(-lv.width // factor), -(-lv.height // factor)
        reduced = np.empty((reduced_h, reduced_w, 3), dtype=np.uint8)
        for by in range(0, lv.height, block):
            for bx in range(0, lv.width, block):
                bw, bh = min(block, lv.width - bx), min(block, lv.height - by)
                tile = self._reader.read(lv.index, bx, by, bw, bh)
                if factor > 1:
                    tile = np.asarray(Image.fromarray(tile).reduce(factor))
                ry, rx = by // factor, bx // factor
                reduced[ry : ry + tile.shape[0], rx : rx + tile.shape[1]] = tile
        if reduced.shape[:2] == (out_h, out_w):
            return reduced
        return np.asarray(Image.fromarray(reduced).resize((out_w, out_h), Image.Resampling.BILINEAR))

    def close(self) -> None:
        """Release the file."""
        self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        dims = ", ".join(f"{lv.width}x{lv.height}" for lv in self.levels)
        return (
            f"Slide({self.path.name!r}, backend={self.backend!r}, vendor={self.vendor!r}, levels=[{dims}], "
            f"mpp=({self.mpp[0]:.4g}, {self.mpp[1]:.4g}) from {self.mpp_source})"
        )


def _levels(dims: list[tuple[int, int]], downsamples: list[float], mpp: tuple[float, float]) -> tuple[SlideLevel, ...]:
    w0, h0 = dims[0]
    return tuple(
        SlideLevel(i, w, h, float(ds), mpp[0] * w0 / w, mpp[1] * h0 / h)
        for i, ((w, h), ds) in enumerate(zip(dims, downsamples, strict=True))
    )


class MissingMppError(DataError):
    """A slide that does not say how many microns a pixel spans, opened without ``mpp=`` (callers add their own
    hint, such as a command-line option)."""


def _resolve_mpp(
    found: tuple[tuple[float, float], str] | None, user: tuple[float, float] | None, path: Path
) -> tuple[tuple[float, float], str]:
    if user is not None:
        if found is not None and max(abs(u / f - 1.0) for u, f in zip(user, found[0], strict=True)) > 0.01:
            logger.warning(
                "%s: using mpp=%s given by the caller instead of %s from %s", path.name, user, found[0], found[1]
            )
        return user, "user"
    if found is None:
        raise MissingMppError(
            f"{path.name} does not say how many microns a pixel spans",
            expected="microns per pixel in the slide (openslide.mpp-x, Aperio MPP, OME PhysicalSizeX, or TIFF "
            "resolution in centimetres)",
            hint="pass mpp= (level-0 microns per pixel: about 0.25 at 40x, 0.5 at 20x) if you know the scanner's",
            path=path,
        )
    return found


def _user_mpp(mpp: float | tuple[float, float] | None) -> tuple[float, float] | None:
    if mpp is None:
        return None
    values = (mpp, mpp) if isinstance(mpp, int | float) else tuple(mpp)
    if len(values) != 2 or not all(isinstance(v, int | float) and _plausible(float(v)) for v in values):
        raise ConfigError(
            f"mpp={mpp!r} is invalid",
            expected=f"microns per pixel as a number or (x, y) pair between {_MPP_RANGE[0]} and {_MPP_RANGE[1]}",
        )
    return float(values[0]), float(values[1])


def _open_openslide(path: Path) -> tuple[Any | None, str | None, str]:
    """``(OpenSlide handle or None, vendor or None, failure reason)``."""
    try:
        import openslide
    except ImportError as exc:  # the optional extra is not installed
        return None, None, f"openslide-python is not installed ({exc}); install medseg[histology]"
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
        if vendor is None:
            return None, None, "OpenSlide does not recognise the format"
        return openslide.OpenSlide(str(path)), vendor, ""
    except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        return None, None, f"OpenSlide: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _open_tifffile(path: Path) -> tuple[Any | None, list[Any], str]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, ValueError, OSError for non-TIFF or broken headers
        return None, [], f"tifffile: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    try:
        pages = _tiff_pyramid(tif, path)
    except DataError as err:
        tif.close()
        return None, [], err.what
    except Exception as exc:  # malformed IFD structures
        tif.close()
        return None, [], f"tifffile: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return tif, pages, ""


def _tiff_properties(tif: Any) -> dict[str, str]:
    page = tif.pages.first
    props = {f"tiff.{tag.name}": str(tag.value)[:500] for tag in page.tags if tag.name != "ImageDescription"}
    props["tiff.ImageDescription"] = str(getattr(page, "description", "") or "")[:2000]
    return props


def is_slide_file(path: str | Path) -> bool:
    """Whether ``path`` is a whole-slide image for :func:`open_slide` rather than a 2D image for ``load_image``.

    Vendor suffixes (:data:`VENDOR_SLIDE_SUFFIXES`: ``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ...) always are. A
    ``.tif`` / ``.tiff`` is a slide when it is tiled and either holds a pyramid (reduced levels in SubIFDs or further
    pages) or is larger than :data:`SLIDE_MIN_SIDE` pixels on a side; a stripped or small single-level TIFF is a 2D
    image. Only the TIFF header is read.

    Args:
        path: a file path (a missing file, a folder or another suffix gives ``False``).

    Returns:
        ``True`` for a slide.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file() or suffix not in SLIDE_SUFFIXES:
        return False
    if suffix in VENDOR_SLIDE_SUFFIXES:
        return True
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            if not tif.series:
                return False
            series = tif.series[0]
            page = series.levels[0].keyframe
            if not page.is_tiled:
                return False
            return len(series.levels) > 1 or max(int(page.imagewidth), int(page.imagelength)) > SLIDE_MIN_SIDE
    except Exception:  # not a readable TIFF: load_image reports what is wrong with it
        return False


def open_slide(
    path: str | Path,
    *,
    mpp: float | tuple[float, float] | None = None,
    backend: SlideBackend = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Slide:
    """Open a whole-slide image for region reads.

    Args:
        path: slide file (see :data:`SLIDE_SUFFIXES`; for MIRAX the ``.mrxs`` file beside its data folder).
        mpp: level-0 microns per pixel, as one number or ``(x, y)``; required when the slide does not say, and
            overrides the slide's value otherwise.
        backend: ``"auto"`` (module docstring), ``"openslide"`` or ``"tifffile"``.
        max_pixels: the largest window :meth:`Slide.read_region` decodes at once.

    Returns:
        An open :class:`Slide`.

    Raises:
        DataError: missing file, a format neither backend reads, no microns per pixel (and no ``mpp=``), a truncated
            file (tiles past its end), or pyramid levels that are not images of decreasing size.
        ConfigError: an invalid ``mpp``, ``backend`` or ``max_pixels``.

    Examples::

        >>> with open_slide("CMU-1.svs") as slide:
        ...     slide.levels[0].dimensions, slide.mpp
        ...     tile = slide.read_region(0, 1000, 1000, 224, 224)  # (224, 224, 3) uint8
        ((46000, 32914), (0.499, 0.499))
    """
    p = Path(path)
    user_mpp = _user_mpp(mpp)
    if backend not in ("auto", "openslide", "tifffile"):
        raise ConfigError(f"backend {backend!r} is unknown", expected="'auto', 'openslide' or 'tifffile'")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels={max_pixels!r} is invalid", expected="a positive integer")
    if not p.is_file():
        raise DataError(f"{p} not found", expected="an existing slide file", path=p)
    osr, vendor, os_reason = (None, None, "not tried") if backend == "tifffile" else _open_openslide(p)
    tif, pages, tf_reason = (None, [], "not tried") if backend == "openslide" else _open_tifffile(p)
    try:
        use_openslide = osr is not None and (
            tif is None or vendor != "generic-tiff" or osr.level_count >= len(pages) or backend == "openslide"
        )
        if tif is not None:  # a TIFF-based file (SVS, SCN, BIF, generic): refuse truncated copies up front
            _check_segments(tif, pages, p)
        if use_openslide and osr is not None:
            props = dict(osr.properties)
            found = _mpp_from_properties(props)
            if found is None and tif is not None:
                found = _mpp_from_tiff(tif)
            mpp_pair, source = _resolve_mpp(found, user_mpp, p)
            levels = _levels(list(osr.level_dimensions), list(osr.level_downsamples), mpp_pair)
            if tif is not None:
                tif.close()
            reader: _Reader = _OpenSlideReader(osr, p)
            return Slide(
                p, reader, levels, vendor=str(vendor), mpp_source=source, properties=props, max_pixels=max_pixels
            )
        if tif is None:
            raise DataError(
                f"cannot open {p.name} as a whole-slide image ({os_reason}; {tf_reason})",
                expected=_FORMATS_EXPECTED,
                hint="plain 2D images (PNG, JPEG, single-page TIFF) load with medseg.io.load_image",
                path=p,
            )
        mpp_pair, source = _resolve_mpp(_mpp_from_tiff(tif), user_mpp, p)
        dims = [(int(pg.imagewidth), int(pg.imagelength)) for pg in pages]
        downsamples = [0.5 * (dims[0][0] / w + dims[0][1] / h) for w, h in dims]
        levels = _levels(dims, downsamples, mpp_pair)
        props = _tiff_properties(tif)
        if osr is not None:
            osr.close()
        return Slide(
            p, _TiffReader(tif, pages, p), levels, vendor="tiff", mpp_source=source, properties=props,
            max_pixels=max_pixels,
        )  # fmt: skip
    except BaseException:
        if osr is not None:
            osr.close()
        if tif is not None:
            tif.close()
        raise
