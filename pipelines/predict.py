"""``medseg predict`` and ``medseg evaluate``: a run directory applied to images or to a labelled dataset."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from medseg import open_predictor
from medseg.core.atomic import atomic_open
from medseg.core.errors import DataError
from medseg.data import load_manifest
from medseg.data.classification import load_classification_dataset, read_sample
from medseg.data.labels import resolve_label_names
from medseg.inference.contract import SegmentationPredictor
from medseg.inference.prompts import Box, PromptObject, Prompts
from medseg.io import load_image, save_mask
from medseg.io.geometry import spacing_from_affine
from medseg.io.slide import SLIDE_SUFFIXES, is_slide_file
from medseg.training.classification import classification_metrics
from medseg.training.metrics import case_metrics, summarize
from medseg.transforms.io import LoadImage
from medseg.transforms.sam import box_from_mask, box_rule_of, volume_slice
from pipelines.batch import case_name, list_cases, shard

logger = logging.getLogger(__name__)

SUFFIXES = {"nifti": ".nii.gz", "nrrd": ".nrrd", "png": ".png"}


@dataclass(frozen=True)
class PredictedCase:
    """One written mask."""

    input: Path
    mask: Path
    stats: dict[str, Any]


@dataclass(frozen=True)
class PredictSettings:
    """How ``medseg predict`` runs a batch.

    Attributes:
        tta: override the model's test-time augmentation default (``None`` keeps it).
        fmt: output format, a key of :data:`SUFFIXES`.
        prompts: boxes / points, required by prompted models and refused by the others.
        allow_external_data: read detached headers (``.nhdr``, ``.mhd``) whose data file lies in the header's folder.
        num_parts: split the cases into this many parts (see :mod:`pipelines.batch`).
        part_id: the part this process predicts, ``0 .. num_parts - 1``.
        skip_existing: leave a case alone when its mask and statistics are already in the output folder.
        backend: network backend of dense models (``torch`` or ``openvino``; ``None``: the run's ``infer.backend``).
        precision: network precision (``auto``, ``fp32``, ``bf16``, ``fp16``; ``None``: the run's).
        tta_axes: the axes ``tta`` mirrors (``"x"``, ``"x,z"``, ``"all"``; ``None``: the run's ``infer.tta_axes``,
            or every axis an nnU-Net checkpoint allows).
        target_mpp: whole slides: microns per pixel of the tiles (``None``: the run's, else 0.5).
        slide_mpp: whole slides: level-0 microns per pixel, for slides that do not say.
        save_probabilities: dense 3D models: also write per-class probabilities (``uint8`` or ``float16``) as
            ``<case>_prob_<class>.nii|.npy`` plus ``<case>_prob.json``; ``None``: the run's
            ``infer.save_probabilities``.
    """

    tta: bool | None = None
    fmt: str = "nifti"
    prompts: Prompts | None = None
    allow_external_data: bool = False
    num_parts: int = 1
    part_id: int = 0
    skip_existing: bool = False
    backend: str | None = None
    precision: str | None = None
    tta_axes: str | None = None
    target_mpp: float | None = None
    slide_mpp: float | None = None
    save_probabilities: str | None = None

    def open_options(self) -> dict[str, Any]:
        """The options :func:`medseg.open_predictor` takes from these settings (only those given)."""
        given = (("backend", self.backend), ("precision", self.precision), ("tta_axes", self.tta_axes))
        return {k: v for k, v in given if v is not None}

    def __post_init__(self) -> None:
        if self.tta_axes is not None:
            from medseg.inference.engine import parse_mirror_axes

            parse_mirror_axes(self.tta_axes)  # a bad value fails before any model is opened
        if self.fmt not in SUFFIXES:
            raise DataError(f"unknown output format {self.fmt!r}", expected=f"one of {sorted(SUFFIXES)}")
        if self.save_probabilities not in (None, "none", "uint8", "float16"):
            raise DataError(
                f"--save-probabilities {self.save_probabilities!r} is not a probability type",
                expected="uint8, float16 or none",
            )


def predict(
    run: Path,
    inputs: list[Path],
    out: Path,
    settings: PredictSettings | None = None,
    *,
    predictor: SegmentationPredictor | None = None,
    show_progress: bool = False,
) -> list[PredictedCase]:
    """Segment every case of ``inputs`` (or this process's part of them); write ``<out>/<case>_seg.<ext>`` and then
    ``<case>_seg.json`` (label statistics), each atomically.

    Prompts are checked once, before the first image is read, by the predictor itself. A folder of image files stands
    for its cases (:func:`pipelines.batch.list_cases`).

    Returns:
        The cases written by this call (skipped cases are not listed).
    """
    s = settings or PredictSettings()
    cases = shard(list_cases(inputs), s.num_parts, s.part_id)
    predictor = predictor or open_predictor(run, **s.open_options())
    predictor.check_prompts(s.prompts)
    out.mkdir(parents=True, exist_ok=True)
    slides = [p for p in cases if is_slide_file(p)]
    written = [c for c in (slide_case(predictor, p, out, s, show_progress) for p in slides) if c is not None]
    cases = [p for p in cases if p not in slides]
    if predictor.task == "classification":
        found = (classify_case(predictor, path, out, s) for path in _track(cases, "classifying", show_progress))
        return written + [case for case in found if case is not None]
    for path in _track(cases, "predicting", show_progress):
        case = predict_case(predictor, path, out, s)
        if case is not None:
            written.append(case)
    if s.num_parts > 1:
        logger.info("part %d of %d: %d case(s) written", s.part_id, s.num_parts, len(written))
    return written


def predict_case(
    predictor: SegmentationPredictor, path: Path, out: Path, settings: PredictSettings
) -> PredictedCase | None:
    """Predict one case into ``out``: the mask, then its statistics (each atomic). ``None`` when skipped."""
    mask_target = out / f"{case_name(path)}_seg{SUFFIXES[settings.fmt]}"
    stats_target = out / f"{case_name(path)}_seg.json"
    if settings.skip_existing and mask_target.is_file() and stats_target.is_file():
        logger.info("%s: outputs exist, skipped", path)
        return None
    image = load_image(path, allow_external_data=settings.allow_external_data)
    extra: dict[str, Any] = {}
    probabilities = _probability_output(predictor, out / f"{case_name(path)}_prob", settings)
    if probabilities is not None:
        extra["probabilities_out"] = probabilities
    result = predictor.predict(image, tta=settings.tta, prompts=settings.prompts, **extra)
    mask_path = save_mask(result.mask, result.image, mask_target)
    stats = result.stats_dict()
    if probabilities is not None:
        stats["probabilities"] = str(probabilities.prefix.with_name(f"{probabilities.prefix.name}.json"))
    with atomic_open(stats_target) as fh:  # written last: its presence means the case is complete
        json.dump(stats, fh, indent=2)
    logger.info("%s → %s", path, mask_path)
    return PredictedCase(path, mask_path, stats)


def _probability_output(predictor: Any, prefix: Path, settings: PredictSettings) -> Any:
    """The :class:`~medseg.inference.gridmap.ProbabilityOutput` asked for (option, else the run's), or ``None``."""
    import inspect

    from medseg.core.errors import ConfigError
    from medseg.inference.gridmap import ProbabilityOutput

    config = getattr(predictor, "config", None)
    dtype = settings.save_probabilities or (config.infer.save_probabilities if config is not None else "none")
    if dtype in (None, "none"):
        return None
    if "probabilities_out" not in inspect.signature(predictor.predict).parameters or (
        getattr(predictor, "engine", True) is None  # an nnU-Net folder predicted by nnUNetPredictor itself
    ):
        raise ConfigError(
            f"--save-probabilities is not available for {type(predictor).__name__}",
            expected="a run directory of a dense model, or an nnU-Net results folder predicted by medseg's engine",
            hint="leave out --save-probabilities",
        )
    return ProbabilityOutput(prefix, dtype)


def slide_case(
    predictor: Any, path: Path, out: Path, settings: PredictSettings, show_progress: bool = False
) -> PredictedCase | None:
    """Predict a whole slide into ``out/<case>_slide/`` (:func:`medseg.data.slide_inference.predict_slide_file`), then
    write ``out/<case>_slide.json`` (the summary) last. ``None`` when skipped.

    The folder is filled under a temporary name and renamed when complete, so a reader never sees half of it; a
    classifier writes ``overlay.png``, ``heatmap.ome.tif``, ``heatmap.npy`` and ``tiles.json`` (per-tile
    probabilities), a segmentation model ``labels.ome.tif``, ``contours.geojson`` and ``overlay.png``.
    """
    from medseg.data.slide_inference import predict_slide_file
    from medseg.io.slide import MissingMppError
    from pipelines.progress import CountProgress

    name = path.name[: -len(path.suffix)] if path.suffix.lower() in SLIDE_SUFFIXES else case_name(path)
    folder, marker = out / f"{name}_slide", out / f"{name}_slide.json"
    if settings.skip_existing and marker.is_file() and folder.is_dir():
        logger.info("%s: outputs exist, skipped", path)
        return None
    partial = Path(tempfile.mkdtemp(prefix=f".{name}_slide.partial-", dir=out))
    try:
        with CountProgress(f"tiles of {path.name}", enabled=show_progress) as bar:
            result = predict_slide_file(
                predictor, path, partial, target_mpp=settings.target_mpp, slide_mpp=settings.slide_mpp,
                progress=bar.update,
            )  # fmt: skip
    except MissingMppError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(
            err.what, expected=err.expected, hint="pass --slide-mpp (level-0 microns per pixel: 0.25 at 40x, 0.5 at "
            "20x) if you know the scanner's", path=path,
        ) from None  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    result.files = {key: folder / p.name for key, p in result.files.items()}
    stats = {"input": str(path), "folder": str(folder), **result.to_dict()}
    with atomic_open(folder / "summary.json") as fh:
        json.dump(result.to_dict(), fh, indent=1)
    with atomic_open(marker) as fh:  # written last: its presence means the slide is complete
        json.dump(stats, fh, indent=2)
    logger.info("%s → %s (%d tiles)", path, folder, result.tiles)
    return PredictedCase(path, folder, stats)


def classify_case(predictor: Any, path: Path, out: Path, settings: PredictSettings) -> PredictedCase | None:
    """Classify one image into ``out/<case>_class.json`` (``label``, ``label_name``, ``probabilities``; atomic).
    ``None`` when skipped; the returned case's ``mask`` is the JSON file."""
    target = out / f"{case_name(path)}_class.json"
    if settings.skip_existing and target.is_file():
        logger.info("%s: outputs exist, skipped", path)
        return None
    image = load_image(path, allow_external_data=settings.allow_external_data)
    result = predictor.predict_class(image).to_dict()
    with atomic_open(target) as fh:
        json.dump(result, fh, indent=2)
    logger.info("%s → %s (%s)", path, result["label_name"], target)
    return PredictedCase(path, target, result)


def _evaluate_classifier(
    predictor: Any, run: Path, data: Path, out: Path | None, show_progress: bool
) -> dict[str, Any]:
    """Score a classifier on the test split of a classification dataset (else val, else train)."""
    dataset = load_classification_dataset(data)
    split = dataset.evaluation_split()
    samples = dataset.split(split)
    if tuple(dataset.class_names) != tuple(predictor.label_names):
        logger.warning("dataset classes %s differ from the model's %s", dataset.class_names, predictor.label_names)
    probs = [predictor.probabilities([read_sample(s)])[0] for s in _track(list(samples), "evaluating", show_progress)]
    metrics = classification_metrics([s.label for s in samples], np.stack(probs), predictor.label_names)
    cases = {
        s.case_id: {"label": s.label, "predicted": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]}
        for s, p in zip(samples, probs, strict=True)
    }
    report = {"run": str(run), "data": str(data), "split": split, **metrics, "cases": cases}
    name = Path(data).stem if Path(data).is_file() else Path(data).name
    target = out or Path(run) / "evaluation" / f"{name}.json"
    with atomic_open(target) as fh:
        json.dump(report, fh, indent=2)
    report["path"] = str(target)
    return report


def evaluate(
    run: Path,
    data: Path,
    out: Path | None = None,
    *,
    predictor: SegmentationPredictor | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Predict every labelled case of a dataset and score it (Dice, HD95 per label); write JSON. A classifier is
    scored on a classification dataset instead (accuracy, balanced accuracy, macro F1, AUROC, confusion matrix).

    A prompted model is scored as the SAM papers do: one box per label and slice, taken from the reference.
    """
    predictor = predictor or open_predictor(run)
    if predictor.task == "classification":
        return _evaluate_classifier(predictor, run, data, out, show_progress)
    manifest = load_manifest(data)
    labelled = [c for c in manifest.cases if c.label is not None and c.label.exists()]
    if not labelled:
        raise DataError(f"dataset {data} has no labelled case to evaluate", hint="evaluate needs labels")
    names = predictor.label_names
    per_case = {}
    prompted = predictor.needs_prompts
    if prompted:  # one box per label and slice from the reference: scored against the dataset's own labels
        names = resolve_label_names(manifest)
    for case in _track(labelled, "evaluating", show_progress):
        image = LoadImage(allow_external_data=True)(list(case.images))
        label = np.asarray(load_image(case.label, allow_external_data=True))[0]
        if label.shape != tuple(image.shape[1:]):
            raise DataError(f"label {case.label} has shape {label.shape}, image {tuple(image.shape[1:])}")
        if prompted:
            mask = _predict_with_label_boxes(predictor, image, label.astype(np.int64))
        else:
            mask = predictor.predict(image).mask
        spacing = spacing_from_affine(np.asarray(image.affine))
        per_case[case.case_id] = case_metrics(mask, label.astype(np.int64), names, spacing)
    report = {"run": str(run), "data": str(data), "cases": per_case, **summarize(per_case)}
    target = out or Path(run) / "evaluation" / f"{Path(data).name}.json"
    with atomic_open(target) as fh:
        json.dump(report, fh, indent=2)
    report["path"] = str(target)
    return report


def _predict_with_label_boxes(predictor: Any, image: Any, label: np.ndarray) -> np.ndarray:
    """A prompted model's label map from one box per (label value, slice) taken from the reference (as the SAM papers
    evaluate): the box the model's own ``box_rule`` draws on that slice (DB-SAM: all of the label's pixels, SAM-UNet:
    its largest connected component)."""
    rule = box_rule_of(getattr(predictor, "model", None))
    objects, values = [], []
    for v in (int(u) for u in np.unique(label) if u > 0):
        for z in np.flatnonzero((label == v).any(axis=(0, 1))):
            box = box_from_mask(volume_slice(torch.from_numpy(label[None] == v), int(z))[0], rule)
            if box is None:
                continue
            (x0, x1), (y0, y1) = _widen(box[0], box[2], label.shape[0]), _widen(box[1], box[3], label.shape[1])
            objects.append(PromptObject(box=Box((x0, y0, z), (x1, y1, z)), points=(), name=None))
            values.append(v)
    mask = np.zeros(label.shape, np.int64)
    if not objects:
        return mask
    result = predictor.predict(image, prompts=Prompts(tuple(objects), "voxel"))
    lookup = np.array([0, *values], dtype=np.int64)
    return lookup[np.asarray(result.mask, dtype=np.int64)]


def _widen(lo: int, hi: int, size: int) -> tuple[int, int]:
    """A box side of one voxel (lo == hi) widened to two, inside ``[0, size - 1]``."""
    if hi > lo:
        return lo, hi
    return (lo, lo + 1) if lo + 1 < size else (lo - 1, lo)


def _track(items: list, description: str, enabled: bool) -> Iterable:
    """A rich progress bar over ``items`` when enabled and there is more than one."""
    return track(items, description=description, transient=True) if enabled and len(items) > 1 else items
