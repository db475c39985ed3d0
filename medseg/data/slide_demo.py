"""Data of the histology demo: tissue vs background tiles from a real slide, as a class-folder dataset.

The source is the real Aperio slide ``cmu_small_region.svs`` when its path is given (the test-data cache), else a
slide assembled from scikit-image's ``ihc.png`` (real IHC-stained tissue): four pieces of it placed on a glass-white
canvas with scanner noise, written as a pyramidal OME-TIFF at 0.5 um/px so that it is read like any slide.

Tiles are laid over the whole slide (:func:`medseg.data.histology.make_tile_grid` with ``min_tissue=0``) and labelled
by the tissue mask (:func:`medseg.data.histology.detect_tissue`): ``tissue`` when at least ``tissue_share`` of the
tile is tissue, ``background`` when at most ``background_share`` is, and left out in between. The split is spatial,
so that overlapping or neighbouring tiles never sit on both sides: the columns left of ``train_fraction`` of the
slide's width train, the rest is held out (``test/``). The slide itself is returned too, for the demo's heatmap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError
from medseg.data.histology import detect_tissue, iter_tile_batches, make_tile_grid
from medseg.io.slide import open_slide
from medseg.io.slide_writer import write_pyramidal_tiff

logger = logging.getLogger(__name__)

__all__ = ["HistologyDemoData", "ihc_slide", "write_histology_demo"]

CLASSES = ("background", "tissue")


@dataclass(frozen=True)
class HistologyDemoData:
    """What :func:`write_histology_demo` wrote.

    Attributes:
        root: the class-folder dataset (``train/<class>/``, ``test/<class>/``).
        slide: the slide the tiles come from.
        source: ``"svs"`` or ``"ihc"``.
        counts: tiles per ``split/class``.
    """

    root: Path
    slide: Path
    source: str
    counts: dict[str, int]


def ihc_slide(path: Path, *, seed: int = 0) -> Path:
    """A pyramidal OME-TIFF slide (1536 x 1024 px, 0.5 um/px) of four ``ihc.png`` pieces on noisy glass."""
    import skimage.data
    from PIL import Image

    ihc = np.asarray(Image.open(Path(skimage.data.data_dir) / "ihc.png").convert("RGB"))
    rng = np.random.default_rng(seed)
    canvas = np.clip(rng.normal(238, 4, (1024, 1536, 3)), 0, 255).astype(np.uint8)
    pieces = [ihc[:256, :256], ihc[256:, :256], ihc[:256, 256:], ihc[256:, 256:]]
    corners = [(64, 96), (600, 300), (120, 1000), (620, 1250)]
    for (y, x), piece in zip(corners, pieces, strict=True):
        canvas[y : y + 256, x : x + 256] = piece
    return write_pyramidal_tiff(canvas, path, mpp=0.5, tile=256)


def write_histology_demo(
    out: Path,
    *,
    svs: Path | None = None,
    target_mpp: float | None = None,
    tile_size: int = 128,
    overlap: float = 0.5,
    tissue_share: float = 0.6,
    background_share: float = 0.02,
    train_fraction: float = 0.6,
) -> HistologyDemoData:
    """Write the demo's tile dataset under ``out`` (module docstring).

    Args:
        out: folder for ``tiles/`` (and ``slide.ome.tif`` when built from ``ihc.png``).
        svs: the real slide, or ``None`` (or a missing file) for the ``ihc.png`` slide.
        target_mpp: microns per pixel of the tiles (default: 1.0 on the real slide, 0.5 on the ``ihc.png`` one).
        tile_size: tile side in pixels.
        overlap: share of a tile its neighbours overlap (more tiles from a small slide).
        tissue_share: least tissue share of a ``tissue`` tile.
        background_share: largest tissue share of a ``background`` tile.
        train_fraction: share of the slide's width (from the left) whose tiles train.

    Returns:
        Where the tiles and the slide are.

    Raises:
        DataError: a split that lacks one of the classes.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    source = "svs" if svs is not None and Path(svs).is_file() else "ihc"
    slide_path = Path(svs) if source == "svs" else ihc_slide(out / "slide.ome.tif")
    target_mpp = target_mpp or (1.0 if source == "svs" else 0.5)
    root = out / "tiles"
    counts: dict[str, int] = {}
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
        grid = make_tile_grid(slide, target_mpp=target_mpp, tile_size=tile_size, overlap=overlap, min_tissue=0.0)
        ext = grid.read_size * grid.level_downsample[0], grid.read_size * grid.level_downsample[1]
        shares = tissue.box_fractions(grid.coords[:, 0], grid.coords[:, 1], ext[0], ext[1])
        inside = (grid.coords[:, 0] + ext[0] <= slide.dimensions[0]) & (
            grid.coords[:, 1] + ext[1] <= slide.dimensions[1]
        )
        split_x = train_fraction * slide.dimensions[0]
        for batch in iter_tile_batches(slide, grid, batch_size=32):
            rgb = (batch.tiles.clamp(0, 1) * 255.0 + 0.5).byte().permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(batch.positions):
                share = float(shares[i])
                cls = "tissue" if share >= tissue_share else "background" if share <= background_share else None
                if cls is None or not inside[i]:
                    continue
                x = float(grid.coords[i, 0])
                if x < split_x <= x + ext[0]:  # straddles the split line
                    continue
                split = "train" if x + ext[0] <= split_x else "test"
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                r, c = (int(v) for v in grid.indices[i])
                Image.fromarray(rgb[j]).save(folder / f"{source}_r{r:03d}_c{c:03d}.png")
                counts[f"{split}/{cls}"] = counts.get(f"{split}/{cls}", 0) + 1
    missing = [f"{s}/{c}" for s in ("train", "test") for c in CLASSES if not counts.get(f"{s}/{c}")]
    if missing:
        raise DataError(
            f"the histology demo tiles of {slide_path.name} lack {', '.join(missing)} (counts {counts})",
            hint="change train_fraction or the tile size",
        )
    logger.info("histology demo: %s tiles from %s: %s", source, slide_path.name, counts)
    return HistologyDemoData(root, slide_path, source, counts)
