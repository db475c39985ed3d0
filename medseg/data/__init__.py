"""Datasets on disk: layouts (MSD, nnU-Net raw, paired folders), the manifest, verification and splits.

Examples::

    >>> from medseg.data import load_manifest, verify_dataset, split_cases
    >>> manifest = load_manifest("Dataset003_Liver")
    >>> problems = verify_dataset(manifest)
    >>> train, val = split_cases(manifest.cases, val_fraction=0.2, seed=0)
"""

from medseg.data.histology import (
    StainNormalizer,
    TileBatch,
    TileGrid,
    TissueMask,
    detect_tissue,
    iter_tile_batches,
    make_tile_grid,
)
from medseg.data.histology_outputs import SlidePrediction, SlideSettings, predict_slide
from medseg.data.layouts import EXPECTED_LAYOUTS, detect_layout, load_manifest
from medseg.data.manifest import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    Case,
    LayoutName,
    Manifest,
    image_extension,
    infer_modality,
    strip_image_extension,
)
from medseg.data.splits import kfold, split_cases
from medseg.data.verify import PROBLEM_KINDS, Problem, ProblemKind, format_problems, require_valid, verify_dataset

__all__ = [
    "EXPECTED_LAYOUTS",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "PROBLEM_KINDS",
    "Case",
    "LayoutName",
    "Manifest",
    "Problem",
    "SlidePrediction",
    "SlideSettings",
    "StainNormalizer",
    "TileBatch",
    "TileGrid",
    "TissueMask",
    "ProblemKind",
    "detect_layout",
    "detect_tissue",
    "format_problems",
    "image_extension",
    "infer_modality",
    "iter_tile_batches",
    "kfold",
    "load_manifest",
    "make_tile_grid",
    "predict_slide",
    "split_cases",
    "strip_image_extension",
    "require_valid",
    "verify_dataset",
]
