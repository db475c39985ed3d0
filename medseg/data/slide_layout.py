"""A training dataset of whole slides with annotations, cut once into tiles that the existing trainers read.

Layout::

    DATA/
      slides/<name>.svs | .ndpi | .mrxs | .scn | pyramidal .tif ...
      annotations/<name>.geojson          QuPath export: Polygons / MultiPolygons, class in
                                          properties.classification.name (a FeatureCollection, a list of
                                          Features or one Feature)
      annotations/<name>.tif | .tiff | .png   or a label image of the whole slide at any scale (0 = background)
      dataset.yaml                        optional, see :class:`SlideDatasetSettings`

A slide without an annotation file is refused. :func:`tile_slide_dataset` finds each slide's tissue
(:func:`medseg.data.histology.detect_tissue`), lays the tile grid at ``target_mpp``
(:func:`medseg.data.histology.make_tile_grid`), reads the tissue tiles and rasterises the annotation onto each tile
(polygons with holes: a pixel belongs to a polygon when its centre lies inside the outline and outside every hole;
later features paint over earlier ones). It then writes the tiles into a layout the library already trains on:

* ``task="segmentation"``: a 2D paired folder (``images/`` RGB PNG tiles, ``masks/`` label PNGs, ``dataset.yaml``
  with the label names), read by :func:`medseg.data.layouts.load_manifest`;
* ``task="classification"``: class folders (``train/<class>/``, ``val/<class>/`` for ``val_slides``), the tile's
  class being the majority label of its pixels; with ``unannotated: skip`` tiles whose majority is background
  (tissue nobody annotated) are left out.

The tiles are cached in ``DATA/.medseg-tiles/<task>-<mpp>um-<size>px-<key>/``, where the key digests the settings,
every slide's name, size and modification time, and every annotation's bytes; a second run with the same inputs
reuses the folder, a changed annotation gets a new one. The folder is written under a temporary name and renamed
when complete, so an interrupted run leaves no half-written cache. ``slide_tiles.json`` in it records how the tiles
were cut (target mpp, tile size, labels, each tile's slide, level-0 corner and label), which is how a model trained
on them later predicts slides at the same resolution (:mod:`medseg.data.slide_inference`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.core.errors import ConfigError, DataError
from medseg.data.histology import TileGrid, detect_tissue, iter_tile_batches, make_tile_grid
from medseg.data.slide_inference import TILES_MANIFEST
from medseg.io.slide import SLIDE_SUFFIXES, Slide, is_slide_file, open_slide

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FOLDER",
    "SlideDataset",
    "SlideDatasetSettings",
    "is_slide_dataset",
    "load_slide_dataset",
    "rasterize_features",
    "tile_slide_dataset",
]

CACHE_FOLDER = ".medseg-tiles"
EXPECTED_SLIDE_LAYOUT = (
    "slides/<name>.<svs|ndpi|mrxs|scn|tif...> and annotations/<name>.geojson (QuPath export) or a label image "
    "annotations/<name>.<tif|tiff|png>"
)
_LABEL_IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
SlideTask = Literal["segmentation", "classification"]


@dataclass(frozen=True)
class SlideDatasetSettings:
    """``dataset.yaml`` of a slide dataset (every field optional).

    Attributes:
        labels: ``{value: name}``; value 0 is the background (unannotated pixels). Default: ``background`` plus the
            class names found in the GeoJSON files in sorted order (label images: ``class_<value>``).
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels (default: the model's input size, else 224).
        overlap: share of a tile its neighbours overlap, in [0, 1).
        min_tissue: smallest tissue share of a tile that is kept.
        slide_mpp: level-0 microns per pixel for slides that do not say.
        val_slides: slide names (without suffix) whose tiles validate instead of training.
        unannotated: ``background`` (tiles of unannotated tissue are class / label 0) or ``skip`` (classification:
            such tiles are left out).
        name: dataset name.
    """

    labels: dict[int, str] | None = None
    target_mpp: float = 0.5
    tile_size: int | None = None
    overlap: float = 0.0
    min_tissue: float = 0.5
    slide_mpp: float | None = None
    val_slides: tuple[str, ...] = ()
    unannotated: Literal["background", "skip"] = "background"
    name: str | None = None

    @classmethod
    def from_yaml(cls, path: Path) -> SlideDatasetSettings:
        """Read ``dataset.yaml``; unknown keys and invalid values are refused with the file named."""
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{path} is not valid YAML ({err})".replace("\n", " "), path=path) from None
        if not isinstance(raw, dict):
            raise DataError(f"{path} holds {type(raw).__name__}", expected="a mapping of settings", path=path)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names) - {"modality"})
        if unknown:
            raise DataError(f"{path}: unknown key(s) {unknown}", expected=f"keys among {names}", path=path)
        raw.pop("modality", None)
        try:
            if raw.get("labels") is not None:
                raw["labels"] = {int(k): str(v) for k, v in dict(raw["labels"]).items()}
            raw["val_slides"] = tuple(str(s) for s in raw.get("val_slides") or ())
            settings = cls(**raw)
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: {err}", expected="the settings of docs/histology.md", path=path) from None
        settings.check(path)
        return settings

    def check(self, where: Path | str = "dataset.yaml") -> None:
        """Refuse out-of-range values (``DataError`` naming ``where``)."""
        problems = []
        if not (isinstance(self.target_mpp, int | float) and self.target_mpp > 0):
            problems.append(f"target_mpp={self.target_mpp!r} (a positive number)")
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size < 16):
            problems.append(f"tile_size={self.tile_size!r} (an integer >= 16)")
        if not 0.0 <= float(self.overlap) < 1.0:
            problems.append(f"overlap={self.overlap!r} (in [0, 1))")
        if not 0.0 <= float(self.min_tissue) <= 1.0:
            problems.append(f"min_tissue={self.min_tissue!r} (in [0, 1])")
        if self.unannotated not in ("background", "skip"):
            problems.append(f"unannotated={self.unannotated!r} (background or skip)")
        if self.labels is not None and (self.labels.get(0) is None or any(v < 0 for v in self.labels)):
            problems.append(f"labels={self.labels!r} (value 0 is the background; values >= 0)")
        if problems:
            raise DataError(f"{where}: invalid " + "; ".join(problems), expected="the settings of docs/histology.md")


@dataclass
class SlideDataset:
    """Slides paired with their annotation files.

    Attributes:
        root: the dataset folder.
        slides: ``{name: slide path}`` sorted by name.
        annotations: ``{name: annotation path}`` (GeoJSON or label image).
        settings: the ``dataset.yaml`` settings.
        label_names: name of each label value (index = value).
    """

    root: Path
    slides: dict[str, Path]
    annotations: dict[str, Path]
    settings: SlideDatasetSettings
    label_names: tuple[str, ...] = field(default=())


def _slide_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and is_slide_file(p))


def is_slide_dataset(root: str | Path) -> bool:
    """Whether ``root`` follows the slide layout: ``slides/`` with at least one slide, and ``annotations/``."""
    root = Path(root)
    return root.is_dir() and (root / "annotations").is_dir() and bool(_slide_files(root / "slides"))


def _read_geojson(path: Path) -> list[dict[str, Any]]:
    """The Features of a QuPath GeoJSON export (FeatureCollection, list of Features, or one Feature)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid GeoJSON ({err})", hint="export it again from QuPath", path=path) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) for f in data):
        raise DataError(
            f"{path} holds no GeoJSON Features",
            expected="a FeatureCollection (or list) of Features with Polygon or MultiPolygon geometries",
            path=path,
        )
    return data


def _feature_class(feature: dict[str, Any]) -> str | None:
    props = feature.get("properties") or {}
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls if isinstance(cls, str) else None
    return str(name) if name else None


def _polygons(feature: dict[str, Any], path: Path) -> list[list[np.ndarray]]:
    """Each polygon of a Feature as ``[outer ring, *holes]``, rings ``(N, 2)`` level-0 ``(x, y)``."""
    geometry = feature.get("geometry") or {}
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
    if polys is None:
        return []  # points and lines carry no area
    try:
        return [[np.asarray(ring, dtype=np.float64)[:, :2] for ring in poly] for poly in polys]
    except (ValueError, IndexError, TypeError):
        raise DataError(
            f"{path}: a {kind} has malformed coordinates", expected="[[x, y], ...] rings", path=path
        ) from None


def load_slide_dataset(root: str | Path) -> SlideDataset:
    """Pair every slide with its annotation and resolve the label names.

    Raises:
        DataError: not the slide layout, a slide without annotation, invalid ``dataset.yaml`` or GeoJSON, or a
            GeoJSON class the ``labels`` of ``dataset.yaml`` do not name.
    """
    root = Path(root)
    if not is_slide_dataset(root):
        raise DataError(f"{root} is not a slide dataset", expected=EXPECTED_SLIDE_LAYOUT, path=root)
    meta = root / "dataset.yaml"
    settings = SlideDatasetSettings.from_yaml(meta) if meta.is_file() else SlideDatasetSettings()
    slides = {p.name[: -len(p.suffix)]: p for p in _slide_files(root / "slides")}
    annotations: dict[str, Path] = {}
    missing = []
    for name in slides:
        found = [root / "annotations" / f"{name}{s}" for s in (".geojson", ".json", *_LABEL_IMAGE_SUFFIXES)]
        found = [p for p in found if p.is_file()]
        if not found:
            missing.append(name)
        else:
            annotations[name] = found[0]
    if missing:
        raise DataError(
            f"{len(missing)} slide(s) of {root} have no annotation: {', '.join(missing[:5])}",
            expected="annotations/<name>.geojson or annotations/<name>.<tif|tiff|png> for every slide",
            hint="export the annotations from QuPath as GeoJSON, or move unannotated slides out of slides/",
            path=root,
        )
    unknown_vals = [v for v in settings.val_slides if v not in slides]
    if unknown_vals:
        raise DataError(f"{meta}: val_slides {unknown_vals} are not in slides/", expected=f"among {list(slides)}")
    dataset = SlideDataset(root, slides, annotations, settings)
    dataset.label_names = _label_names(dataset)
    return dataset


def _label_names(ds: SlideDataset) -> tuple[str, ...]:
    found: set[str] = set()
    max_value = 0
    for path in ds.annotations.values():
        if path.suffix.lower() in (".geojson", ".json"):
            found |= {c for c in map(_feature_class, _read_geojson(path)) if c is not None}
        elif ds.settings.labels is None:
            max_value = max(max_value, int(_read_label_image(path)[0].max()))
    if ds.settings.labels is not None:
        top = max(ds.settings.labels)
        names = tuple(ds.settings.labels.get(v, f"class_{v}") for v in range(top + 1))
        unknown = sorted(found - set(names))
        if unknown:
            raise DataError(
                f"GeoJSON classes {unknown} are not among the labels of {ds.root / 'dataset.yaml'}",
                expected=f"classes among {list(names[1:])}",
                hint="add them to `labels`, or rename them in QuPath",
            )
        return names
    return ("background", *sorted(found), *(f"class_{v}" for v in range(len(found) + 1, max_value + 1)))


def _read_label_image(path: Path) -> tuple[np.ndarray, Path]:
    """A label image ``(rows, cols)`` of integer values (TIFF: the first page; PNG via Pillow)."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            arr = np.asarray(Image.open(path))
        else:
            import tifffile

            arr = tifffile.imread(path, key=0)
    except Exception as exc:  # unreadable files of any kind
        raise DataError(f"cannot read label image {path} ({type(exc).__name__}: {exc})", path=path) from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"label image {path} has shape {arr.shape} and type {arr.dtype}",
            expected="one channel of integer label values (0 = background)",
            path=path,
        )
    return arr, path


def rasterize_features(
    features: list[tuple[int, list[list[np.ndarray]]]],
    box: tuple[float, float, float, float],
    size: int,
) -> np.ndarray:
    """Paint polygons onto one tile.

    Args:
        features: ``(label value, polygons)`` in painting order; a polygon is ``[outer ring, *holes]``, each ring
            ``(N, 2)`` level-0 ``(x, y)`` along pixel edges (QuPath's and :func:`labels_to_geojson`'s convention).
        box: the tile's level-0 ``(x0, y0, width, height)``.
        size: tile side in pixels.

    Returns:
        ``(size, size)`` uint16 labels: a pixel takes the value of the last polygon whose outline holds its centre
        and whose holes do not.
    """
    from skimage.draw import polygon as fill

    x0, y0, w, h = box
    sx, sy = size / w, size / h
    out = np.zeros((size, size), dtype=np.uint16)
    for value, polys in features:
        for rings in polys:
            outer = rings[0]
            if (
                outer[:, 0].max() < x0
                or outer[:, 0].min() > x0 + w
                or outer[:, 1].max() < y0
                or outer[:, 1].min() > y0 + h
            ):
                continue
            mask = np.zeros((size, size), dtype=bool)
            for k, ring in enumerate(rings):
                rr, cc = fill((ring[:, 1] - y0) * sy - 0.5, (ring[:, 0] - x0) * sx - 0.5, shape=(size, size))
                mask[rr, cc] = k == 0
            out[mask] = value
    return out


def _label_source(ds: SlideDataset, name: str, slide: Slide) -> Any:
    """A function ``box, size -> (size, size) labels`` for one slide's annotation."""
    path = ds.annotations[name]
    if path.suffix.lower() in (".geojson", ".json"):
        index = {n: v for v, n in enumerate(ds.label_names)}
        features = []
        for feature in _read_geojson(path):
            cls = _feature_class(feature)
            if cls is None:
                logger.warning("%s: a feature without classification is ignored", path.name)
                continue
            features.append((index[cls], _polygons(feature, path)))
        return lambda box, size: rasterize_features(features, box, size)
    labels, _ = _read_label_image(path)
    w0, h0 = slide.dimensions
    fy, fx = labels.shape[0] / h0, labels.shape[1] / w0

    def sample(box: tuple[float, float, float, float], size: int) -> np.ndarray:
        x0, y0, w, h = box
        centres = (np.arange(size) + 0.5) / size
        rows = np.clip(((y0 + centres * h) * fy).astype(np.int64), 0, labels.shape[0] - 1)
        cols = np.clip(((x0 + centres * w) * fx).astype(np.int64), 0, labels.shape[1] - 1)
        inside = ((y0 + centres * h) < h0)[:, None] & ((x0 + centres * w) < w0)[None, :]
        return np.where(inside, labels[rows[:, None], cols[None, :]], 0).astype(np.uint16)

    return sample


def _cache_key(ds: SlideDataset, task: str, tile_size: int) -> str:
    parts: dict[str, Any] = {"task": task, "tile_size": tile_size, "settings": asdict(ds.settings), "version": 1}
    parts["labels"] = list(ds.label_names)
    parts["slides"] = [(n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in ds.slides.items()]
    parts["annotations"] = [(n, hashlib.sha256(p.read_bytes()).hexdigest()) for n, p in ds.annotations.items()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tiles(ds: SlideDataset, name: str, tile_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, TileGrid, int]]:
    """``(rgb (H, W, 3) uint8, labels (H, W), grid, index)`` of every tissue tile of one slide."""
    s = ds.settings
    with open_slide(ds.slides[name], mpp=s.slide_mpp) as slide:
        tissue = detect_tissue(slide) if s.min_tissue > 0 else None
        grid = make_tile_grid(
            slide, target_mpp=s.target_mpp, tile_size=tile_size, overlap=s.overlap, tissue=tissue,
            min_tissue=s.min_tissue,
        )  # fmt: skip
        labels_of = _label_source(ds, name, slide)
        ext = (grid.read_size * grid.level_downsample[0], grid.read_size * grid.level_downsample[1])
        for batch in iter_tile_batches(slide, grid, batch_size=16):
            rgb = (batch.tiles.clamp(0, 1) * 255.0 + 0.5).byte().permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(batch.positions):
                x, y = (float(v) for v in grid.coords[i])
                yield rgb[j], labels_of((x, y, ext[0], ext[1]), tile_size), grid, int(i)


def tile_slide_dataset(
    root: str | Path,
    *,
    task: SlideTask,
    tile_size: int | None = None,
) -> Path:
    """Cut a slide dataset into tiles (or reuse the cached tiles) and return the folder to train on.

    Args:
        root: the slide dataset folder (module docstring).
        task: ``segmentation`` (2D paired folder) or ``classification`` (class folders).
        tile_size: tile side when ``dataset.yaml`` gives none (the model's input size); default 224.

    Returns:
        The tile folder ``root/.medseg-tiles/<task>-<mpp>um-<size>px-<key>``.

    Raises:
        DataError: see :func:`load_slide_dataset`; a slide with no tissue tile; a classification dataset whose tiles
            fall into fewer than two classes; a dataset folder that cannot be written.
        ConfigError: an unknown ``task``.
    """
    if task not in ("segmentation", "classification"):
        raise ConfigError(f"task {task!r} is unknown", expected="segmentation or classification")
    ds = load_slide_dataset(root)
    size = int(ds.settings.tile_size or tile_size or 224)
    key = _cache_key(ds, task, size)
    cache = ds.root / CACHE_FOLDER
    target = cache / f"{task}-{ds.settings.target_mpp:g}um-{size}px-{key}"
    if (target / TILES_MANIFEST).is_file():
        logger.info("%s: reusing the tiles in %s", ds.root, target)
        return target
    try:
        cache.mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    except OSError as err:
        raise DataError(
            f"cannot write the tile cache in {ds.root} ({err.strerror})",
            expected="a writable dataset folder",
            hint="copy the slides and annotations to a folder you can write",
            path=ds.root,
        ) from None
    try:
        records = _write_tiles(ds, task, size, scratch)
        manifest = {
            "task": task, "target_mpp": ds.settings.target_mpp, "tile_size": size, "label_names": list(ds.label_names),
            "source": str(ds.root), "settings": asdict(ds.settings), "tiles": records,
        }  # fmt: skip
        (scratch / TILES_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished the same tiles first: keep its folder
            if not (target / TILES_MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("%s: %d %s tiles of %d px at %g um/px in %s", ds.root, len(records), task, size,
                ds.settings.target_mpp, target)  # fmt: skip
    return target


def _write_tiles(ds: SlideDataset, task: str, size: int, out: Path) -> list[dict[str, Any]]:
    from PIL import Image

    records: list[dict[str, Any]] = []
    if task == "segmentation":
        (out / "images").mkdir()
        (out / "masks").mkdir()
    for name in ds.slides:
        kept = 0
        for rgb, labels, grid, i in _tiles(ds, name, size):
            row, col = (int(v) for v in grid.indices[i])
            stem = f"{name}_r{row:04d}_c{col:04d}"
            record: dict[str, Any] = {"slide": name, "x": int(grid.coords[i][0]), "y": int(grid.coords[i][1])}
            if task == "segmentation":
                Image.fromarray(rgb).save(out / "images" / f"{stem}.png")
                Image.fromarray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16)).save(
                    out / "masks" / f"{stem}.png"
                )
                record["file"] = f"images/{stem}.png"
            else:
                counts = np.bincount(labels.ravel(), minlength=len(ds.label_names))
                label = int(np.argmax(counts))
                if label == 0 and ds.settings.unannotated == "skip":
                    continue
                split = "val" if name in ds.settings.val_slides else "train"
                folder = out / split / ds.label_names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb).save(folder / f"{stem}.png")
                record.update(file=f"{split}/{ds.label_names[label]}/{stem}.png", label=label,
                              share=round(float(counts[label]) / labels.size, 4))  # fmt: skip
            records.append(record)
            kept += 1
        if kept == 0:
            raise DataError(
                f"slide {name} of {ds.root} gave no tile",
                expected="tissue tiles (and, with unannotated: skip, annotated ones)",
                hint="lower min_tissue in dataset.yaml, or check the annotation",
                path=ds.slides[name],
            )
    if task == "segmentation":
        import yaml

        meta = {"name": ds.settings.name or ds.root.name, "labels": dict(enumerate(ds.label_names))}
        (out / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    else:
        classes = sorted({r["label"] for r in records if r["file"].startswith("train/")})
        if len(classes) < 2:
            raise DataError(
                f"the training tiles of {ds.root} fall into {len(classes)} class(es) "
                f"({', '.join(ds.label_names[c] for c in classes) or 'none'})",
                expected="tiles of at least two classes (a tile's class is the majority label of its pixels)",
                hint="annotate regions of another class, or keep unannotated: background",
            )
    return records
