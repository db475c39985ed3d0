"""``medseg predict`` and ``medseg evaluate``: a run directory applied to images or to a labelled dataset."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from medseg.core.atomic import atomic_open
from medseg.core.errors import DataError
from medseg.data import load_manifest, strip_image_extension
from medseg.inference import Predictor
from medseg.io import load_image, save_mask
from medseg.io.geometry import spacing_from_affine
from medseg.training.metrics import case_metrics, summarize
from medseg.transforms.io import LoadImage

logger = logging.getLogger(__name__)

SUFFIXES = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


@dataclass(frozen=True)
class PredictedCase:
    """One written mask."""

    input: Path
    mask: Path
    stats: dict[str, Any]


def case_name(path: Path) -> str:
    """File or folder name without image extensions (``a.nii.gz`` → ``a``)."""
    name = path.name
    if name.lower().endswith(".zip"):
        return name[: -len(".zip")]
    return strip_image_extension(name) or name


def predict(
    run: Path,
    inputs: list[Path],
    out: Path,
    *,
    tta: bool | None = None,
    fmt: str = "nifti",
    predictor: Predictor | None = None,
    show_progress: bool = False,
) -> list[PredictedCase]:
    """Segment every input; write ``<out>/<case>_seg.<ext>`` and ``<case>_seg.json`` (label statistics)."""
    if fmt not in SUFFIXES:
        raise DataError(f"unknown output format {fmt!r}", expected=f"one of {sorted(SUFFIXES)}")
    predictor = predictor or Predictor.from_run_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in _track(inputs, "predicting", show_progress):
        result = predictor.predict(path, tta=tta)
        mask_path = save_mask(result.mask, result.image, out / f"{case_name(path)}_seg{SUFFIXES[fmt]}")
        stats = result.stats_dict()
        with atomic_open(out / f"{case_name(path)}_seg.json") as fh:
            json.dump(stats, fh, indent=2)
        logger.info("%s → %s", path, mask_path)
        written.append(PredictedCase(path, mask_path, stats))
    return written


def evaluate(
    run: Path, data: Path, out: Path | None = None, *, predictor: Predictor | None = None, show_progress: bool = False
) -> dict[str, Any]:
    """Predict every labelled case of a dataset and score it (Dice, HD95 per label); write JSON."""
    predictor = predictor or Predictor.from_run_dir(run)
    manifest = load_manifest(data)
    labelled = [c for c in manifest.cases if c.label is not None and c.label.exists()]
    if not labelled:
        raise DataError(f"dataset {data} has no labelled case to evaluate", hint="evaluate needs labels")
    names = predictor.label_names
    per_case = {}
    for case in _track(labelled, "evaluating", show_progress):
        result = predictor.predict(LoadImage()(list(case.images)))
        label = np.asarray(load_image(case.label))[0]
        if label.shape != tuple(result.mask.shape):
            raise DataError(f"label {case.label} has shape {label.shape}, image {tuple(result.mask.shape)}")
        spacing = spacing_from_affine(np.asarray(result.image.affine))
        per_case[case.case_id] = case_metrics(result.mask, label.astype(np.int64), names, spacing)
    report = {"run": str(run), "data": str(data), "cases": per_case, **summarize(per_case)}
    target = out or Path(run) / "evaluation" / f"{Path(data).name}.json"
    with atomic_open(target) as fh:
        json.dump(report, fh, indent=2)
    report["path"] = str(target)
    return report


def _track(items: list, description: str, enabled: bool) -> Iterable:
    """A rich progress bar over ``items`` when enabled and there is more than one."""
    return track(items, description=description, transient=True) if enabled and len(items) > 1 else items
