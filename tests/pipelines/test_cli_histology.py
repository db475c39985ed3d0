"""``medseg predict RUN SLIDE``: whole slides through the CLI, for a classifier and a 2D segmentation model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.io.slide import is_slide_file, open_slide
from tests.helpers import run_cli
from tests.slide_helpers import require_real_slide, tiny_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slide-runs")
    return {
        "classifier": tiny_run(root / "cls", "medvit2_tiny", ("benign", "tumor")),
        "segmenter": tiny_run(root / "seg", "medvit2_seg_tiny", ("background", "tumor")),
    }


def test_is_slide_file_tells_slides_from_2d_images(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "plain.tif")
    tifffile.imwrite(tmp_path / "tiled.tif", rgb, tile=(32, 32), photometric="rgb")  # tiled but one small level
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:
        tif.write(rgb, tile=(32, 32), photometric="rgb", subifds=1)
        tif.write(rgb[::2, ::2], tile=(32, 32), photometric="rgb", subfiletype=1)
    assert not is_slide_file(tmp_path / "plain.tif") and not is_slide_file(tmp_path / "tiled.tif")
    assert is_slide_file(tmp_path / "pyramid.tif")
    (tmp_path / "fake.svs").write_bytes(b"x")
    assert is_slide_file(tmp_path / "fake.svs") and not is_slide_file(tmp_path / "missing.svs")


def test_predict_slide_with_a_classifier(runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    slide = require_real_slide()
    out = tmp_path / "out"
    args = ["predict", str(runs["classifier"]), str(slide), "--out", str(out), "--mpp", "1.0", "--no-progress"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 0, text
    folder = out / "cmu_small_region_slide"
    assert f"{folder}/" in text and "classification" in text
    assert {p.name for p in folder.iterdir()} == {
        "heatmap.npy", "heatmap.ome.tif", "overlay.png", "summary.json", "tiles.json",
    }  # fmt: skip
    assert not list(out.glob(".*partial*")), "the temporary folder is renamed, not left behind"
    summary = json.loads((out / "cmu_small_region_slide.json").read_text())
    assert summary["task"] == "classification" and summary["mpp"][0] == pytest.approx(1.0, rel=0.01)
    assert all(Path(p).parent == folder for p in summary["files"].values())
    tiles = json.loads((folder / "tiles.json").read_text())
    assert tiles["label_names"] == ["benign", "tumor"] and len(tiles["tiles"]) == summary["tiles"] > 10
    probs = np.array([[t["probabilities"][n] for n in ("benign", "tumor")] for t in tiles["tiles"]])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    heat = np.load(folder / "heatmap.npy")
    t0 = tiles["tiles"][0]
    assert heat[:, t0["row"], t0["col"]] == pytest.approx(probs[0], abs=1e-5)
    with open_slide(folder / "heatmap.ome.tif") as written:  # a pyramidal TIFF a slide viewer opens
        assert written.mpp == pytest.approx((0.499, 0.499), rel=0.01)
    assert np.asarray(Image.open(folder / "overlay.png")).ndim == 3

    # --skip-existing leaves a complete slide alone; without it the folder is replaced
    marker = out / "cmu_small_region_slide.json"
    before = marker.stat().st_mtime_ns
    code, text = run_cli([*args, "--skip-existing"], capsys, monkeypatch)
    assert code == 0 and marker.stat().st_mtime_ns == before, text


def test_predict_slide_with_a_segmentation_model(runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    slide = require_real_slide()
    out = tmp_path / "out"
    args = ["predict", str(runs["segmenter"]), str(slide), "--out", str(out), "--mpp", "1.0", "--no-progress"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 0, text
    folder = out / "cmu_small_region_slide"
    assert {"labels.ome.tif", "contours.geojson", "overlay.png", "summary.json"} <= {p.name for p in folder.iterdir()}
    geo = json.loads((folder / "contours.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    for feature in geo["features"]:
        assert feature["properties"]["classification"]["name"] == "tumor"
    labels = tifffile.imread(folder / "labels.ome.tif")
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    with open_slide(slide) as s:  # stitched at the tiles' read level (level 0, scaled): the slide's own size
        assert labels.shape == (s.dimensions[1], s.dimensions[0])


def test_slide_without_mpp_is_refused_with_the_option_named(
    runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[100:400, 100:400] = (150, 60, 160)  # a stained square on glass
    path = tmp_path / "nompp.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", subifds=1)
        tif.write(rgb[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    out = tmp_path / "out"
    args = ["predict", str(runs["classifier"]), str(path), "--out", str(out), "--no-progress"]
    code, text = run_cli(args, capsys, monkeypatch)
    assert code == 1 and "does not say how many microns" in text and "--slide-mpp" in text, text
    assert not list(out.glob("*")), "nothing is left behind"
    code, text = run_cli([*args, "--slide-mpp", "0.5", "--mpp", "0.5"], capsys, monkeypatch)
    assert code == 0, text
    assert json.loads((out / "nompp_slide.json").read_text())["tiles"] >= 1
