"""A trained model applied to a whole slide: the tile function of a predictor and one call for a slide file.

:func:`predict_slide_file` opens a slide (:func:`medseg.io.slide.open_slide`), builds the tile function of a
predictor (:func:`predictor_tile_fn`) and hands both to :func:`medseg.data.histology_outputs.predict_slide`, which
tiles the tissue at the target resolution and writes the slide-level outputs. The CLI (``medseg predict RUN
SLIDE.svs``) and the server's slide jobs both call it, so the two give the same files.

The predictor is used through its public contract only (``task``, ``label_names``, ``config``, and
``probabilities`` for a classifier or ``predict`` for a segmentation model), so every kind of model opened by
:func:`medseg.open_predictor` works:

* a classifier (``task == "classification"``) gets each tile as the 8-bit RGB image it was trained on and returns
  ``(B, K)`` softmax probabilities (its own resize and intensity preset apply);
* a 2D segmentation model gets each tile as a one-slice raster image ``(3, X = column, Y = row, 1)`` of 8-bit values
  with a 1 mm pixel, exactly as :func:`medseg.io.read_raster` reads a PNG tile in training, and returns its
  probabilities ``(K, h, w)`` on the tile's grid.

The target resolution is, first match wins: ``target_mpp``; the microns per pixel of the tiles the run was trained
on (the ``slide_tiles.json`` of its training data, written by :mod:`medseg.data.slide_layout`);
:data:`DEFAULT_TARGET_MPP`. The tile side is the model's input size (``model.roi_size`` of the run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.core.errors import ModelInputError
from medseg.data.histology_outputs import SlidePrediction, predict_slide
from medseg.io.slide import open_slide

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGET_MPP",
    "TILES_MANIFEST",
    "predict_slide_file",
    "predictor_tile_fn",
    "run_target_mpp",
    "tile_side",
]

#: Microns per pixel of the tiles when neither the caller nor the run says (20x, the resolution of PathMNIST).
DEFAULT_TARGET_MPP = 0.5
#: File in a tile dataset folder that records how its tiles were cut (:mod:`medseg.data.slide_layout`).
TILES_MANIFEST = "slide_tiles.json"


def _to_uint8(tiles: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` float in [0, 1] -> ``(B, H, W, 3)`` uint8."""
    return (tiles.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def predictor_tile_fn(predictor: Any) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``tile_fn`` of :func:`~medseg.data.histology_outputs.predict_slide` for a predictor (module docstring).

    Args:
        predictor: an object from :func:`medseg.open_predictor`: a classifier (``probabilities``) or a dense 2D
            segmentation model (``predict(image, keep_probabilities=True)``).

    Returns:
        ``tiles (B, 3, H, W) float32 in [0, 1] -> (B, K)`` (classifier) or ``(B, K, H, W)`` (segmentation).

    Raises:
        ModelInputError: a 3D or prompted segmentation model, which cannot segment RGB tiles.
    """
    if predictor.task == "classification":

        def classify(tiles: torch.Tensor) -> np.ndarray:
            return np.asarray(predictor.probabilities(list(_to_uint8(tiles)), batch_size=max(1, len(tiles))))

        return classify
    card = predictor.card
    if card.spatial_dims != 2 or card.needs_prompts:
        kind = "prompted" if card.needs_prompts else f"{card.spatial_dims}D"
        raise ModelInputError(
            f"model {card.name!r} is a {kind} segmentation model: it cannot segment slide tiles",
            expected="a classifier or a 2D segmentation model without prompts (medvit2_seg_*, unet2d, ...)",
            hint="train a 2D model on slide tiles: medseg train SLIDES --model medvit2_seg_tiny",
        )
    from monai.data import MetaTensor

    def segment(tiles: torch.Tensor) -> np.ndarray:
        out = []
        for i, rgb in enumerate(_to_uint8(tiles)):
            data = torch.from_numpy(np.ascontiguousarray(np.transpose(rgb, (2, 1, 0))[..., None])).float()
            image = MetaTensor(data, affine=torch.eye(4, dtype=torch.float64))
            image.meta.update({"filename_or_obj": f"tile_{i}", "source_format": "raster", "space": "RAS"})
            result = predictor.predict(image, keep_probabilities=True)
            probs = np.asarray(result.probabilities, dtype=np.float32)  # (K, X, Y, 1) on the tile's grid
            out.append(np.transpose(probs[..., 0], (0, 2, 1)))
        return np.stack(out)

    return segment


def run_target_mpp(predictor: Any) -> float | None:
    """Microns per pixel of the slide tiles the predictor's run was trained on, or ``None`` when it does not say."""
    root = getattr(getattr(getattr(predictor, "config", None), "data", None), "root", None)
    if not root:
        return None
    manifest = Path(root) / TILES_MANIFEST
    try:
        return float(json.loads(manifest.read_text())["target_mpp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tile_side(predictor: Any) -> int:
    """The tile side handed to the model: the run's square input size (``model.roi_size``), else the card's."""
    config = getattr(predictor, "config", None)
    roi = getattr(getattr(config, "model", None), "roi_size", None) or predictor.card.roi_size
    roi = [int(r) for r in roi][:2]
    if roi[0] != roi[1]:
        raise ModelInputError(
            f"model {predictor.card.name!r} takes {roi[0]}x{roi[1]} inputs",
            expected="a square model input for square slide tiles",
        )
    return roi[0]


def predict_slide_file(
    predictor: Any,
    path: str | Path,
    out_dir: str | Path,
    *,
    target_mpp: float | None = None,
    slide_mpp: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> SlidePrediction:
    """Predict a whole slide with a trained model and write the slide-level outputs into ``out_dir``.

    Args:
        predictor: an object from :func:`medseg.open_predictor` (classifier or 2D segmentation model).
        path: the slide file.
        out_dir: the output folder (``heatmap.npy``, ``overlay.png``, ``heatmap.ome.tif``, ``tiles.json`` for a
            classifier; ``labels.ome.tif``, ``contours.geojson``, ``overlay.png`` for segmentation; ``summary.json``).
        target_mpp: microns per pixel of the tiles (default: the run's, else :data:`DEFAULT_TARGET_MPP`).
        slide_mpp: level-0 microns per pixel of the slide, required when the file does not say.
        progress: ``progress(tiles_done, tiles_total)`` after each batch.
        **options: further :class:`~medseg.data.histology_outputs.SlideSettings` fields (``overlap``,
            ``batch_size``, ``min_tissue``, ...).

    Returns:
        What :func:`~medseg.data.histology_outputs.predict_slide` wrote and measured.

    Raises:
        DataError: an unreadable slide, one without microns per pixel and no ``slide_mpp``, or no tissue.
        ModelInputError: a model that cannot predict RGB tiles.
    """
    tile_fn = predictor_tile_fn(predictor)
    task = "classification" if predictor.task == "classification" else "segmentation"
    mpp = target_mpp if target_mpp is not None else run_target_mpp(predictor)
    source = "given" if target_mpp is not None else "the run's tiles" if mpp is not None else "the default"
    mpp = DEFAULT_TARGET_MPP if mpp is None else mpp
    size = tile_side(predictor)
    with open_slide(path, mpp=slide_mpp) as slide:
        logger.info("%s: %s tiles of %d px at %.3g um/px (%s)", slide.path.name, task, size, mpp, source)
        return predict_slide(
            slide,
            tile_fn,
            out_dir=out_dir,
            task=task,
            target_mpp=mpp,
            tile_size=size,
            label_names=tuple(predictor.label_names),
            progress=progress,
            **options,
        )
