"""Slide-level outputs from per-tile predictions: heatmaps, stitched label images and QuPath GeoJSON.

:func:`predict_slide` tiles a slide (:func:`medseg.data.histology.make_tile_grid`), hands batches of tiles to a
caller's function ``tile_fn(tiles (B, 3, H, W)) -> probabilities`` and assembles what it returns:

* ``task="classification"``: ``tile_fn`` returns ``(B, K)`` class probabilities (or ``(B,)`` for one class). The
  grid of probabilities is saved as ``heatmap.npy`` ``(K, rows, cols)`` (NaN where no tile was kept); the
  probability of ``heatmap_class`` is painted over each tile's footprint (overlaps averaged) into ``overlay.png``
  on the thumbnail and into ``heatmap.ome.tif``, a pyramidal float32 OME-TIFF at ``heatmap_level`` (NaN outside the
  kept tiles); ``tiles.json`` lists every predicted tile (level-0 corner, grid cell, tissue share, probabilities).
* ``task="segmentation"``: ``tile_fn`` returns ``(B, K, h, w)`` probabilities (any ``h, w``: they are resized to
  the tile's footprint). They are stitched at the read level with overlaps averaged, the label of each pixel is
  the arg-max (``K == 1``: probability >= 0.5 is label 1), pixels no kept tile covers are 0. Written as
  ``labels.ome.tif`` (pyramidal uint8/uint16 OME-TIFF with the level's microns per pixel), ``overlay.png`` and
  ``contours.geojson``: one ``Polygon`` Feature (outer ring and holes) per connected region of each label > 0, in
  level-0 pixel coordinates, with QuPath's ``classification`` property (``name``, ``color``), simplified by
  ``simplify_tolerance`` pixels of the contour image.

Every file is written atomically into ``out_dir``, with ``summary.json`` holding the figures of
:class:`SlidePrediction`. Stitching buffers larger than ``memory_limit_bytes`` are memory-mapped files in a
temporary folder inside ``out_dir`` (removed afterwards), so a large slide does not need its label image in RAM.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medseg.core.atomic import atomic_open, atomic_write
from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.data.histology import StainNormalizer, TileGrid, TissueMask, iter_tile_batches, make_tile_grid
from medseg.io.slide import Slide
from medseg.io.slide_writer import write_pyramidal_tiff

logger = logging.getLogger(__name__)

__all__ = [
    "SLIDE_TASKS",
    "SlidePrediction",
    "SlideSettings",
    "labels_to_geojson",
    "paint_tiles",
    "predict_slide",
]

SLIDE_TASKS: tuple[str, ...] = ("segmentation", "classification")
TileFn = Callable[[torch.Tensor], Any]
ProgressFn = Callable[[int, int], None]
# Distinct colours for labels 1, 2, ... (label 0 is background and left uncoloured).
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)  # fmt: skip


@dataclass(frozen=True)
class SlideSettings:
    """How :func:`predict_slide` tiles a slide and what it writes.

    Attributes:
        task: ``"segmentation"`` or ``"classification"``.
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels.
        overlap: share of a tile neighbours overlap, in [0, 1).
        batch_size: tiles per call of ``tile_fn``.
        min_tissue: smallest tissue share of a tile that is predicted.
        label_names: a name per output channel (segmentation: channel 0 is the background); default
            ``background, class_1, ...`` / ``class_0, class_1, ...``.
        heatmap_class: classification: the channel painted into the overlay and TIFF (default: the last).
        heatmap_level: classification: slide level of ``heatmap.ome.tif`` (default: the coarsest).
        thumbnail_side: longer side of ``overlay.png``.
        overlay_alpha: opacity of the colours over the thumbnail.
        contour_max_side: segmentation: contours are traced on the label image reduced (nearest) until its longer
            side is at most this.
        simplify_tolerance: polygon simplification in pixels of the contour image (0: none).
        memory_limit_bytes: stitching buffers above this size are memory-mapped files.
        mpp_rtol: a level within this relative distance of ``target_mpp`` is read without rescaling.
    """

    task: Literal["segmentation", "classification"] = "segmentation"
    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: float = 0.0
    batch_size: int = 16
    min_tissue: float = 0.25
    label_names: tuple[str, ...] | None = None
    heatmap_class: int | None = None
    heatmap_level: int | None = None
    thumbnail_side: int = 1024
    overlay_alpha: float = 0.45
    contour_max_side: int = 4096
    simplify_tolerance: float = 1.0
    memory_limit_bytes: int = 1 << 30
    mpp_rtol: float = 0.1

    def __post_init__(self) -> None:
        if self.task not in SLIDE_TASKS:
            raise ConfigError(f"task {self.task!r} is unknown", expected=f"one of {', '.join(SLIDE_TASKS)}")
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise ConfigError(f"target_mpp={self.target_mpp} is invalid", expected="a positive number")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ConfigError(f"overlay_alpha={self.overlay_alpha} is invalid", expected="a value in [0, 1]")
        for name in ("thumbnail_side", "contour_max_side", "batch_size", "memory_limit_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid", expected="a positive integer")
        if self.simplify_tolerance < 0:
            raise ConfigError(f"simplify_tolerance={self.simplify_tolerance} is invalid", expected="a value >= 0")


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` wrote and measured.

    Attributes:
        task: the task.
        files: output name -> path (``overlay``, ``summary`` and ``heatmap``, ``heatmap_tiff``, ``tiles`` or
            ``labels``, ``geojson``).
        tiles: tiles predicted.
        tiles_total: tiles in the full grid.
        grid_shape: ``(rows, cols)``.
        level: level the tiles were read from.
        mpp: microns per pixel of the tiles ``(x, y)``.
        tissue_fraction: tissue share of the slide (NaN without a tissue mask).
        label_names: a name per output channel.
        classes: per label name, e.g. ``{"pixels", "area_mm2", "polygons"}`` (segmentation) or
            ``{"mean_probability", "tiles_argmax"}`` (classification).
        seconds: wall time.
    """

    task: str
    files: dict[str, Path]
    tiles: int
    tiles_total: int
    grid_shape: tuple[int, int]
    level: int
    mpp: tuple[float, float]
    tissue_fraction: float
    label_names: tuple[str, ...]
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (paths as strings)."""
        out = asdict(self)
        out["files"] = {k: str(v) for k, v in self.files.items()}
        return out


# --------------------------------------------------------------------------------------------------- helpers


def _settings(settings: SlideSettings | None, options: dict[str, Any]) -> SlideSettings:
    base = settings or SlideSettings()
    names = [f.name for f in fields(SlideSettings)]
    unknown = [k for k in options if k not in names]
    if unknown:
        from medseg.core.registry import did_you_mean

        raise ConfigError(
            f"unknown slide setting {unknown[0]!r}",
            expected=f"one of {', '.join(names)}",
            hint=did_you_mean(unknown[0], names) or None,
        )
    if "label_names" in options and options["label_names"] is not None:
        options = {**options, "label_names": tuple(str(n) for n in options["label_names"])}
    return replace(base, **options)


def _probabilities(out: Any, batch: int, task: str) -> np.ndarray:
    """Validate ``tile_fn``'s output: ``(B, K)`` (classification) or ``(B, K, h, w)`` (segmentation), finite."""
    arr = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
    if task == "classification" and arr.ndim == 1:
        arr = arr[:, None]
    want = 2 if task == "classification" else 4
    if arr.ndim != want or arr.shape[0] != batch or arr.shape[1] < 1:
        shape = "(B, K)" if task == "classification" else "(B, K, h, w)"
        raise ModelInputError(
            f"tile_fn returned shape {tuple(arr.shape)} for {batch} tiles",
            expected=f"{task} probabilities of shape {shape} with B = {batch}",
            hint="return softmax/sigmoid probabilities, one row per tile",
        )
    if not np.all(np.isfinite(arr)):
        raise ModelInputError("tile_fn returned non-finite values", expected="finite probabilities")
    return arr.astype(np.float32, copy=False)


def _buffer(shape: tuple[int, ...], limit: int, folder: Path, name: str) -> np.ndarray:
    """A zeroed float32 array in RAM, or a memory-mapped file in ``folder`` when larger than ``limit`` bytes."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes <= limit:
        return np.zeros(shape, dtype=np.float32)
    logger.info("stitching buffer %s of %.1f GiB is memory-mapped in %s", name, nbytes / 2**30, folder)
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)


def paint_tiles(values: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Average per-tile values over their footprints on an image (overlaps averaged, uncovered pixels NaN).

    Args:
        values: ``(N,)`` one value per tile.
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixel boxes on the image (half-open, clipped to it).
        shape: ``(rows, cols)`` of the image.

    Returns:
        ``(rows, cols)`` float32.
    """
    rows, cols = shape
    total = np.zeros((rows + 1, cols + 1), dtype=np.float64)
    count = np.zeros((rows + 1, cols + 1), dtype=np.float64)
    b = np.asarray(boxes, dtype=np.int64)
    x0, y0 = np.clip(b[:, 0], 0, cols), np.clip(b[:, 1], 0, rows)
    x1, y1 = np.clip(b[:, 2], 0, cols), np.clip(b[:, 3], 0, rows)
    ok = (x1 > x0) & (y1 > y0)
    v = np.asarray(values, dtype=np.float64)[ok]
    x0, y0, x1, y1 = x0[ok], y0[ok], x1[ok], y1[ok]
    for arr, val in ((total, v), (count, np.ones_like(v))):
        np.add.at(arr, (y0, x0), val)
        np.add.at(arr, (y0, x1), -val)
        np.add.at(arr, (y1, x0), -val)
        np.add.at(arr, (y1, x1), val)
    total = np.cumsum(np.cumsum(total, axis=0), axis=1)[:rows, :cols]
    count = np.rint(np.cumsum(np.cumsum(count, axis=0), axis=1)[:rows, :cols])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _boxes(grid: TileGrid, scale: tuple[float, float]) -> np.ndarray:
    """Each kept tile's footprint on an image with ``scale`` image pixels per level-0 pixel ``(x, y)``."""
    ext_x = grid.read_size * grid.level_downsample[0]
    ext_y = grid.read_size * grid.level_downsample[1]
    x0, y0 = grid.coords[:, 0].astype(np.float64), grid.coords[:, 1].astype(np.float64)
    return np.stack(
        [
            np.round(x0 * scale[0]),
            np.round(y0 * scale[1]),
            np.maximum(np.round((x0 + ext_x) * scale[0]), np.round(x0 * scale[0]) + 1),
            np.maximum(np.round((y0 + ext_y) * scale[1]), np.round(y0 * scale[1]) + 1),
        ],
        axis=1,
    ).astype(np.int64)


def _colour_map(values: np.ndarray) -> np.ndarray:
    """``(rows, cols)`` values in [0, 1] (NaN allowed) -> ``(rows, cols, 3)`` uint8 with matplotlib's viridis."""
    from matplotlib import colormaps

    rgba = colormaps["viridis"](np.nan_to_num(np.clip(values, 0.0, 1.0)))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _write_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    def write(tmp: Path) -> None:
        Image.fromarray(rgb).save(tmp, format="PNG")

    return atomic_write(path, write)


def _write_json(obj: Any, path: Path) -> Path:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
    return path


def _blend(thumb: np.ndarray, colours: np.ndarray, where: np.ndarray, alpha: float) -> np.ndarray:
    out = thumb.astype(np.float32)
    out[where] = (1.0 - alpha) * out[where] + alpha * colours[where].astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- GeoJSON


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring without the vertices that lie on a straight run (exact: only true corners are kept)."""
    if len(ring) < 5:
        return ring
    d = np.diff(ring, axis=0)
    prev = np.roll(d, 1, axis=0)  # the closing edge precedes the first one
    corner = np.abs(prev[:, 0] * d[:, 1] - prev[:, 1] * d[:, 0]) > 1e-9
    corner[0] = True  # keep the start so that the ring stays closed on the same vertex
    kept = ring[:-1][corner]
    return np.concatenate([kept, kept[:1]], axis=0)


def _owner(point: np.ndarray, components: np.ndarray) -> int:
    """The foreground component a contour vertex (midway between two pixel centres) borders; 0 if none."""
    r, c = float(point[0]), float(point[1])
    for rr in {math.floor(r), math.ceil(r)}:
        for cc in {math.floor(c), math.ceil(c)}:
            if components[rr, cc]:
                return int(components[rr, cc])
    return 0


def labels_to_geojson(
    labels: np.ndarray,
    *,
    label_names: tuple[str, ...],
    scale: tuple[float, float] = (1.0, 1.0),
    simplify_tolerance: float = 1.0,
) -> dict[str, Any]:
    """Trace each label's regions into a GeoJSON FeatureCollection of Polygons with holes (QuPath annotations).

    Args:
        labels: ``(rows, cols)`` integer labels; 0 is background.
        label_names: name of each label value (index = value).
        scale: output units per label pixel ``(x, y)`` (e.g. level-0 pixels per pixel of ``labels``).
        simplify_tolerance: Douglas-Peucker tolerance in pixels of ``labels`` (0: none).

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}``; each Feature's geometry is a Polygon whose first
        ring is the region's outline and further rings its holes, coordinates ``[x, y]`` along pixel edges, and
        ``properties = {"objectType": "annotation", "classification": {"name", "color"}, "label": value}``.
    """
    from skimage.measure import approximate_polygon, find_contours
    from skimage.measure import label as connected_components

    features: list[dict[str, Any]] = []
    for value in (int(v) for v in np.unique(labels) if v != 0):
        binary = np.pad(labels == value, 1)
        # find_contours(fully_connected="low") joins foreground pixels by faces only: label components the same way
        components = connected_components(binary, connectivity=1)
        outers: dict[int, np.ndarray] = {}
        holes: dict[int, list[np.ndarray]] = {}
        for contour in find_contours(binary.astype(np.float32), 0.5, positive_orientation="high"):
            owner = _owner(contour[0], components)
            contour = _drop_collinear(contour)
            if simplify_tolerance > 0 and len(contour) > 5:
                contour = approximate_polygon(contour, tolerance=simplify_tolerance)
            # (row, col) on the padded image -> (x, y) along pixel edges of ``labels``
            ring = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
            if owner == 0 or len(ring) < 4 or not np.array_equal(ring[0], ring[-1]):
                continue
            area = _ring_area(ring)
            # with positive_orientation="high" outlines wind one way around the label and holes the other
            if area < 0:
                outers[owner] = ring
            elif area > 0:
                holes.setdefault(owner, []).append(ring)
        polygons = [[ring, *holes.get(owner, [])] for owner, ring in sorted(outers.items())]
        name = label_names[value] if value < len(label_names) else f"class_{value}"
        colour = list(_PALETTE[(value - 1) % len(_PALETTE)])
        for rings in polygons:
            coords = [np.round(r * np.asarray(scale), 2).tolist() for r in rings]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": coords},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": colour},
                        "label": value,
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


# --------------------------------------------------------------------------------------------------- predict


def _names(settings: SlideSettings, k: int) -> tuple[str, ...]:
    """Label names: one per channel (a one-channel segmentation has two labels, background and foreground)."""
    n = max(k, 2) if settings.task == "segmentation" else k
    if settings.label_names is not None:
        if len(settings.label_names) != n:
            raise ModelInputError(
                f"tile_fn returned {k} channels but {len(settings.label_names)} label names were given",
                expected=f"{n} label names (one per label value)",
            )
        return settings.label_names
    if settings.task == "segmentation":
        return ("background", *(f"class_{i}" for i in range(1, max(k, 2))))
    return tuple(f"class_{i}" for i in range(k))


def _stitch_tile(acc: np.ndarray, weight: np.ndarray, probs: np.ndarray, lx: int, ly: int, size: int) -> None:
    """Add one tile's ``(K, size, size)`` probabilities at level pixel ``(lx, ly)``, cropped to the level."""
    rows, cols = weight.shape
    y0, x0, y1, x1 = max(ly, 0), max(lx, 0), min(ly + size, rows), min(lx + size, cols)
    if y0 >= y1 or x0 >= x1:
        return
    acc[:, y0:y1, x0:x1] += probs[:, y0 - ly : y1 - ly, x0 - lx : x1 - lx]
    weight[y0:y1, x0:x1] += 1.0


def _resize(probs: np.ndarray, size: int) -> np.ndarray:
    """``(B, K, h, w)`` -> ``(B, K, size, size)`` (bilinear; antialiased when shrinking)."""
    if probs.shape[-2:] == (size, size):
        return probs
    t = torch.from_numpy(np.ascontiguousarray(probs))
    shrink = probs.shape[-1] > size or probs.shape[-2] > size
    return torch.nn.functional.interpolate(
        t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    ).numpy()


def predict_slide(
    slide: Slide,
    tile_fn: TileFn,
    *,
    out_dir: str | Path,
    settings: SlideSettings | None = None,
    normalizer: StainNormalizer | None = None,
    tissue: TissueMask | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> SlidePrediction:
    """Predict a whole slide tile by tile and write slide-level outputs (module docstring).

    Args:
        slide: an open slide.
        tile_fn: ``tiles (B, 3, H, W) float32 in [0, 1] -> probabilities`` (numpy or tensor): ``(B, K)`` for
            classification, ``(B, K, h, w)`` for segmentation. Called once per batch, under ``torch.no_grad``.
        out_dir: folder for the outputs (created).
        settings: a :class:`SlideSettings`; ``**options`` override its fields (``task="classification"``,
            ``target_mpp=0.5``, ``tile_size=224``, ``overlap=0.25``, ``batch_size=32``, ...).
        normalizer: a fitted :class:`~medseg.data.histology.StainNormalizer` applied to every tile, or None.
        tissue: a tissue mask to reuse; detected when None and ``min_tissue > 0``.
        progress: called as ``progress(tiles_done, tiles_total)`` after each batch (e.g. to drive a bar).

    Returns:
        :class:`SlidePrediction` with the paths written and per-class figures.

    Raises:
        ConfigError: invalid or unknown settings.
        DataError: no tissue, no tile with enough tissue, or an unreadable slide region.
        ModelInputError: ``tile_fn`` returned the wrong shape or non-finite values, or label names that do not
            match its channels.

    Examples::

        >>> with open_slide("slide.svs") as slide:
        ...     result = predict_slide(slide, model_fn, out_dir="out", task="segmentation", overlap=0.25)
        >>> result.files["geojson"]
        PosixPath('out/contours.geojson')
    """
    cfg = _settings(settings, options)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tissue is None and cfg.min_tissue > 0:
        from medseg.data.histology import detect_tissue

        tissue = detect_tissue(slide)
    grid = make_tile_grid(
        slide,
        target_mpp=cfg.target_mpp,
        tile_size=cfg.tile_size,
        overlap=cfg.overlap,
        tissue=tissue,
        min_tissue=cfg.min_tissue,
        mpp_rtol=cfg.mpp_rtol,
    )
    if len(grid) == 0:
        raise DataError(
            f"no tile of {slide.path.name} has a tissue share of at least {cfg.min_tissue}",
            expected="tiles with tissue",
            hint="lower min_tissue, or check the tissue mask",
            path=slide.path,
        )
    with tempfile.TemporaryDirectory(prefix=".medseg-stitch-", dir=out) as scratch:
        run = _run_segmentation if cfg.task == "segmentation" else _run_classification
        result = run(slide, grid, tile_fn, cfg, out, Path(scratch), normalizer, progress)
    result.tissue_fraction = float(tissue.fraction) if tissue is not None else math.nan
    result.seconds = time.perf_counter() - started
    result.files["summary"] = _write_json(result.to_dict(), out / "summary.json")
    return result


def _batches(
    slide: Slide,
    grid: TileGrid,
    tile_fn: TileFn,
    cfg: SlideSettings,
    normalizer: StainNormalizer | None,
    progress: ProgressFn | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    done = 0
    for batch in iter_tile_batches(slide, grid, batch_size=cfg.batch_size, normalizer=normalizer):
        with torch.no_grad():
            probs = _probabilities(tile_fn(batch.tiles), len(batch.positions), cfg.task)
        yield batch.positions, probs
        done += len(batch.positions)
        if progress is not None:
            progress(done, len(grid))


def _thumbnail(slide: Slide, cfg: SlideSettings) -> tuple[np.ndarray, tuple[float, float]]:
    thumb = slide.thumbnail(cfg.thumbnail_side)
    w0, h0 = slide.dimensions
    return thumb, (thumb.shape[1] / w0, thumb.shape[0] / h0)


def _tile_records(grid: TileGrid, heat: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """``tiles.json``: every predicted tile's level-0 corner, grid cell, tissue share and class probabilities."""
    probs = heat[:, grid.indices[:, 0], grid.indices[:, 1]].T
    tiles = [
        {
            "x": int(x), "y": int(y), "row": int(r), "col": int(c),
            "tissue": None if math.isnan(t) else round(float(t), 4),
            "probabilities": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
        }
        for (x, y), (r, c), t, p in zip(grid.coords, grid.indices, grid.tissue, probs, strict=True)
    ]  # fmt: skip
    return {
        "label_names": list(names),
        "level": grid.level,
        "mpp": list(grid.mpp),
        "tile_size": grid.tile_size,
        "tile_extent_level0": [grid.read_size * grid.level_downsample[0], grid.read_size * grid.level_downsample[1]],
        "tiles": tiles,
    }


def _run_classification(
    slide: Slide,
    grid: TileGrid,
    tile_fn: TileFn,
    cfg: SlideSettings,
    out: Path,
    scratch: Path,
    normalizer: StainNormalizer | None,
    progress: ProgressFn | None,
) -> SlidePrediction:
    del scratch
    heat: np.ndarray | None = None
    for positions, probs in _batches(slide, grid, tile_fn, cfg, normalizer, progress):
        if heat is None:
            heat = np.full((probs.shape[1], *grid.shape), np.nan, dtype=np.float32)
        elif probs.shape[1] != heat.shape[0]:
            raise ModelInputError(f"tile_fn returned {probs.shape[1]} classes after {heat.shape[0]}")
        rows, cols = grid.indices[positions, 0], grid.indices[positions, 1]
        heat[:, rows, cols] = probs.T
    assert heat is not None  # the grid is not empty
    k = heat.shape[0]
    names = _names(cfg, k)
    cls = k - 1 if cfg.heatmap_class is None else cfg.heatmap_class
    if not 0 <= cls < k:
        raise ConfigError(f"heatmap_class={cls} is out of range", expected=f"a class index from 0 to {k - 1}")
    values = heat[cls, grid.indices[:, 0], grid.indices[:, 1]]
    files: dict[str, Path] = {}

    def save_npy(tmp: Path) -> None:
        np.save(tmp, heat)

    files["heatmap"] = atomic_write(out / "heatmap.npy", save_npy)
    files["tiles"] = _write_json(_tile_records(grid, heat, names), out / "tiles.json")
    thumb, scale = _thumbnail(slide, cfg)
    painted = paint_tiles(values, _boxes(grid, scale), thumb.shape[:2])
    files["overlay"] = _write_png(_blend(thumb, _colour_map(painted), ~np.isnan(painted), cfg.overlay_alpha),
                                  out / "overlay.png")  # fmt: skip
    index = slide.level_count - 1 if cfg.heatmap_level is None else cfg.heatmap_level
    if not 0 <= index < slide.level_count:
        raise ConfigError(f"heatmap_level={index} does not exist", expected=f"0 to {slide.level_count - 1}")
    level = slide.levels[index]
    if level.width * level.height > slide.max_pixels:
        raise ConfigError(
            f"heatmap level {level.index} has {level.width}x{level.height} pixels",
            expected=f"at most {slide.max_pixels} pixels",
            hint="choose a coarser heatmap_level",
        )
    w0, h0 = slide.dimensions
    level_map = paint_tiles(values, _boxes(grid, (level.width / w0, level.height / h0)), (level.height, level.width))
    files["heatmap_tiff"] = write_pyramidal_tiff(
        level_map, out / "heatmap.ome.tif", mpp=(level.mpp_x, level.mpp_y), downsample="mean", name=names[cls]
    )
    winners = np.argmax(np.nan_to_num(heat[:, grid.indices[:, 0], grid.indices[:, 1]], nan=-1.0), axis=0)
    classes = {
        name: {
            "mean_probability": float(np.nanmean(heat[i, grid.indices[:, 0], grid.indices[:, 1]])),
            "tiles_argmax": float(np.sum(winners == i)),
        }
        for i, name in enumerate(names)
    }
    return SlidePrediction(
        task=cfg.task, files=files, tiles=len(grid), tiles_total=grid.total, grid_shape=grid.shape,
        level=grid.level, mpp=grid.mpp, tissue_fraction=math.nan, label_names=names, classes=classes,
    )  # fmt: skip


def _run_segmentation(
    slide: Slide,
    grid: TileGrid,
    tile_fn: TileFn,
    cfg: SlideSettings,
    out: Path,
    scratch: Path,
    normalizer: StainNormalizer | None,
    progress: ProgressFn | None,
) -> SlidePrediction:
    width, height = grid.level_size
    acc: np.ndarray | None = None
    weight = _buffer((height, width), cfg.memory_limit_bytes, scratch, "weight")
    level_xy = grid.level_xy
    for positions, probs in _batches(slide, grid, tile_fn, cfg, normalizer, progress):
        if acc is None:
            acc = _buffer((probs.shape[1], height, width), cfg.memory_limit_bytes, scratch, "probabilities")
        elif probs.shape[1] != acc.shape[0]:
            raise ModelInputError(f"tile_fn returned {probs.shape[1]} channels after {acc.shape[0]}")
        probs = _resize(probs, grid.read_size)
        for j, i in enumerate(positions):
            _stitch_tile(acc, weight, probs[j], int(level_xy[i, 0]), int(level_xy[i, 1]), grid.read_size)
    assert acc is not None  # the grid is not empty
    k = acc.shape[0]
    names = _names(cfg, k)
    labels = np.zeros((height, width), dtype=np.uint8 if max(k, 2) <= 256 else np.uint16)
    strip = max(1, cfg.memory_limit_bytes // max(1, 4 * k * width))
    for y in range(0, height, strip):
        a, w = acc[:, y : y + strip], weight[y : y + strip]
        lab = (a[0] >= 0.5 * np.maximum(w, 1)).astype(labels.dtype) if k == 1 else np.argmax(a, axis=0)
        labels[y : y + strip] = np.where(w > 0, lab, 0)
    del acc, weight
    level = slide.levels[grid.level]
    files: dict[str, Path] = {}
    files["labels"] = write_pyramidal_tiff(labels, out / "labels.ome.tif", mpp=(level.mpp_x, level.mpp_y))
    factor = max(1, math.ceil(max(height, width) / cfg.contour_max_side))
    small = labels[::factor, ::factor]
    ds = grid.level_downsample
    geojson = labels_to_geojson(
        small, label_names=names, scale=(factor * ds[0], factor * ds[1]), simplify_tolerance=cfg.simplify_tolerance
    )
    files["geojson"] = _write_json(geojson, out / "contours.geojson")
    thumb, _ = _thumbnail(slide, cfg)
    rows = np.minimum((np.arange(thumb.shape[0]) + 0.5) * height / thumb.shape[0], height - 1).astype(np.int64)
    cols = np.minimum((np.arange(thumb.shape[1]) + 0.5) * width / thumb.shape[1], width - 1).astype(np.int64)
    thumb_labels = labels[rows[:, None], cols[None, :]]
    palette = np.array([(0, 0, 0), *(_PALETTE[(v - 1) % len(_PALETTE)] for v in range(1, max(k, 2)))], np.uint8)
    files["overlay"] = _write_png(
        _blend(thumb, palette[thumb_labels], thumb_labels > 0, cfg.overlay_alpha), out / "overlay.png"
    )
    counts = np.bincount(labels.ravel(), minlength=max(k, 2))
    pixel_mm2 = level.mpp_x * level.mpp_y * 1e-6
    polygons = np.bincount([f["properties"]["label"] for f in geojson["features"]], minlength=max(k, 2))
    classes = {
        name: {"pixels": float(counts[i]), "area_mm2": float(counts[i] * pixel_mm2), "polygons": float(polygons[i])}
        for i, name in enumerate(names)
        if i > 0
    }
    return SlidePrediction(
        task=cfg.task, files=files, tiles=len(grid), tiles_total=grid.total, grid_shape=grid.shape,
        level=grid.level, mpp=grid.mpp, tissue_fraction=math.nan, label_names=names, classes=classes,
    )  # fmt: skip
