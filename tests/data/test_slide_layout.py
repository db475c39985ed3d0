"""Slide datasets: QuPath polygons rasterised onto tiles, the layout's refusals, the tile cache, and training on the
real slide with polygons drawn over its tissue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medseg.core.errors import DataError
from medseg.data.layouts import load_manifest
from medseg.data.slide_inference import TILES_MANIFEST
from medseg.data.slide_layout import (
    CACHE_FOLDER,
    is_slide_dataset,
    load_slide_dataset,
    rasterize_features,
    tile_slide_dataset,
)
from medseg.models import tiny_overrides
from tests.slide_helpers import require_real_slide, slide_dataset


def _square(x0: float, y0: float, s: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]], dtype=np.float64)


def test_rasterize_polygons_with_holes_and_order() -> None:
    outer, hole = _square(10, 20, 40), _square(20, 30, 10)
    features = [(1, [[outer, hole]]), (2, [[_square(40, 20, 20)]])]
    labels = rasterize_features(features, (0.0, 0.0, 100.0, 100.0), 100)
    assert labels[25, 15] == 1 and labels[35, 25] == 0  # inside the outline / inside the hole
    assert labels[25, 45] == 2  # the later feature paints over the earlier one
    assert labels[19, 15] == 0 and labels[20, 15] == 1  # pixel edges: row 20 is the first inside
    assert int((labels == 1).sum()) == 40 * 40 - 10 * 20 - 10 * 10  # the square, less the repainted part and hole
    half = rasterize_features(features, (0.0, 0.0, 100.0, 100.0), 50)  # the same at half resolution
    assert int((half == 1).sum()) == 1300 // 4


def test_layout_refusals(tmp_path: Path) -> None:
    slide = require_real_slide()
    root = tmp_path / "d"
    (root / "slides").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "slides" / slide.name).symlink_to(slide)
    assert is_slide_dataset(root)
    with pytest.raises(DataError, match="have no annotation: cmu_small_region"):
        load_slide_dataset(root)
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 10).tolist()]},
         "properties": {"classification": {"name": "necrosis"}}},
    ]}  # fmt: skip
    (root / "annotations" / "cmu_small_region.geojson").write_text(json.dumps(geo))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"labels": {0: "background", 1: "tumor"}}))
    with pytest.raises(DataError, match=r"classes \['necrosis'\] are not among the labels"):
        load_slide_dataset(root)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"tile_sise": 64}))
    with pytest.raises(DataError, match="unknown key"):
        load_slide_dataset(root)
    (root / "dataset.yaml").unlink()
    assert load_slide_dataset(root).label_names == ("background", "necrosis")
    with pytest.raises(DataError, match="fall into 1 class"):  # the tiny square covers no tile's majority
        tile_slide_dataset(root, task="classification", tile_size=128)
    assert not any((root / CACHE_FOLDER).glob("*")), "a failed run leaves no partial tile folder"
    assert not is_slide_dataset(tmp_path)


def test_tiles_labels_cache_and_segmentation_manifest(tmp_path: Path) -> None:
    slide = require_real_slide()
    root = slide_dataset(tmp_path / "d", slide, target_mpp=1.0, min_tissue=0.5)
    ds = load_slide_dataset(root)
    assert ds.label_names == ("background", "stroma", "tumor")
    folder = tile_slide_dataset(root, task="classification", tile_size=128)
    manifest = json.loads((folder / TILES_MANIFEST).read_text())
    assert manifest["target_mpp"] == 1.0 and manifest["tile_size"] == 128
    classes = {p.name: len(list(p.glob("*.png"))) for p in (folder / "train").iterdir()}
    assert set(classes) == {"background", "stroma", "tumor"} and all(n > 0 for n in classes.values()), classes
    # the 600 px (0.3 mm) squares cover ~ (600 * 0.499 / 128)^2 = 5.5 tiles of 128 um each
    assert 2 <= classes["tumor"] <= 9 and 2 <= classes["stroma"] <= 9, classes
    mtime = (folder / TILES_MANIFEST).stat().st_mtime_ns
    assert tile_slide_dataset(root, task="classification", tile_size=128) == folder  # cached
    assert (folder / TILES_MANIFEST).stat().st_mtime_ns == mtime
    geo = root / "annotations" / "cmu_small_region.geojson"
    data = json.loads(geo.read_text())
    data["features"] = data["features"][:1] + [data["features"][1]] * 1  # same content, new bytes: a new key
    geo.write_text(json.dumps(data, indent=2))
    assert tile_slide_dataset(root, task="classification", tile_size=128) != folder

    manifest_seg = load_manifest(root)  # the layout detector tiles a slide dataset for segmentation
    assert manifest_seg.layout == "paired" and manifest_seg.label_names == ("background", "stroma", "tumor")
    masks = [np.asarray(Image.open(c.label)) for c in manifest_seg.cases]
    values = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert values == {0, 1, 2}
    image = np.asarray(Image.open(manifest_seg.cases[0].images[0]))
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8  # dataset.yaml gives no tile_size: 224


def _config(path: Path, name: str, **data: object) -> Path:
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_overrides(name).items()}
    cfg: dict = {
        "model": {"name": name, "roi_size": [128, 128], "kwargs": kwargs},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "lr": 1e-3, "warmup_iters": 0, "seed": 0},
    }
    if data:
        cfg["data"] = data
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("model", "data"), [("medvit2_tiny", {}), ("unet2d", {"preset": "zscore"})])
def test_train_on_slides(tmp_path: Path, model: str, data: dict) -> None:
    from pipelines.train import TrainRequest, train

    slide = require_real_slide()
    root = slide_dataset(tmp_path / "d", slide, target_mpp=1.0, min_tissue=0.5)
    out = tmp_path / "run"
    result = train(TrainRequest(root, config=_config(tmp_path / "c.yaml", model, **data), out=out, show_progress=False))
    assert result.steps == 2 and (out / "checkpoints" / "best.pt").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    tiles = Path(saved["data"]["root"])
    assert tiles.parent == root / CACHE_FOLDER and (tiles / TILES_MANIFEST).is_file()
    card = json.loads((out / "card.json").read_text())
    names = {"background", "stroma", "tumor"}
    assert set(card["label_names"]) == names
