"""``medseg demo``: the MNI152 brain-tissue task end to end, on CPU in minutes.

Writes ten deformed training subjects and two held-out subjects (stored in another voxel orientation), trains
SegFormer3D at 1.5 mm, predicts the held-out subjects, scores them and draws overlays, all under ``runs/demo/``.

``medseg demo --task angiography`` and ``--task ultrasound`` (:func:`run_modality_demo`) do the same for generated
X-ray angiography runs and ultrasound cines (DICOM, read back through the modality adapters) with ``unet2d``;
``--task histology`` (:func:`run_histology_demo`) trains MedViTV2-tiny on tissue vs background tiles of a real slide
and writes the slide's heatmap.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg import open_predictor
from medseg.core.errors import ConfigError
from medseg.data.demo_brain import write_demo_dataset
from medseg.inference.overlay import save_overlay
from medseg.io import load_image
from pipelines.batch import case_name
from pipelines.predict import evaluate, predict
from pipelines.train import TrainRequest, train

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote things and what it measured."""

    run_dir: Path
    masks: list[Path]
    overlays: list[Path]
    evaluation: dict[str, Any]
    seconds: float


def _clear_out(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force`` (and then only an earlier demo run), else remove it."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(
                f"{out} already holds a demo run", hint="pass --force to replace it, or --out to write elsewhere"
            )
        if not (out / "config.yaml").is_file() and not (out / "data").is_dir():
            raise ConfigError(f"{out} is not empty and is not a demo run; refusing to replace it", hint="use --out")
        shutil.rmtree(out)


def run_demo(
    out: Path = Path("runs/demo"), epochs: int | None = None, show_progress: bool = True, force: bool = False
) -> DemoResult:
    """Generate the data, train, predict the held-out subjects, evaluate and draw overlays.

    Args:
        out: the demo's run directory.
        epochs: override the demo config's epochs.
        show_progress: show a progress bar while training.
        force: replace an earlier demo run in ``out`` (otherwise it is an error).
    """
    start = time.perf_counter()
    out = Path(out)
    _clear_out(out, force)
    train_root, heldout_root = write_demo_dataset(out / "data")
    train(
        TrainRequest(
            data=train_root, config=DEMO_CONFIG, epochs=epochs, out=out, show_progress=show_progress, model=None
        )
    )
    predictor = open_predictor(out)
    images = sorted((heldout_root / "images").glob("*.nii.gz"))
    predicted = predict(out, images, out / "predictions", predictor=predictor)
    overlays = []
    for case in predicted:
        image = load_image(case.input)
        mask = load_image(case.mask)
        overlays.append(
            save_overlay(
                image,
                mask[0].round().long(),
                out / "overlays" / f"{case_name(case.input)}.png",
                predictor.label_names,
                title=f"{case_name(case.input)}: SegFormer3D prediction",
            )
        )
    report = evaluate(out, heldout_root, out / "evaluation" / "heldout.json", predictor=predictor)
    return DemoResult(out, [c.mask for c in predicted], overlays, report, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ angiography and ultrasound

#: ``medseg demo --task``: the MNI brain task (default), the 2D tasks below and the histology task.
DEMO_TASKS = ("brain", "angiography", "ultrasound", "histology")


@dataclass(frozen=True)
class ModalityDemoSize:
    """How big the angiography / ultrasound demo is (the default fits in about two CPU minutes on 2 cores).

    Attributes:
        n_train, n_heldout: generated training and held-out runs / cines.
        epochs, iters_per_epoch, batch_size: training length.
        filters: ``unet2d`` filters per stage (small: the demo trains on CPU; the default card has 32..512).
        frame: ``(rows, columns)`` of the generated frames.
        frames: frames per run / cine.
    """

    n_train: int = 16
    n_heldout: int = 4
    epochs: int = 6
    iters_per_epoch: int = 30
    batch_size: int = 4
    filters: tuple[int, ...] = (8, 16, 32, 64)
    frame: tuple[int, int] = (128, 128)
    frames: int = 12


#: A test-sized demo (well under a minute on 2 cores).
TINY_DEMO = ModalityDemoSize(
    n_train=6, n_heldout=2, epochs=3, iters_per_epoch=15, batch_size=4, filters=(8, 16, 32), frame=(64, 64), frames=8
)


def _modality_config(task: str, size: ModalityDemoSize, roi: tuple[int, int]) -> dict[str, Any]:
    return {
        "name": f"demo_{task}",
        "data": {"preset": "us" if task == "ultrasound" else "zscore", "val_fraction": 0.2},
        "model": {
            "name": "unet2d",
            "roi_size": list(roi),
            "kwargs": {"filters": list(size.filters), "strides": [1] + [2] * (len(size.filters) - 1)},
        },
        "train": {
            "epochs": size.epochs,
            "iters_per_epoch": size.iters_per_epoch,
            "batch_size": size.batch_size,
            "lr": 0.003,
            "warmup_iters": 10,
            "fg_ratio": 0.6,
            "val_every": size.epochs,
            "seed": 0,
        },
        "infer": {"overlap": 0.25, "sw_batch_size": 4, "tta": False},
    }


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    a, b = pred > 0, truth > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def run_modality_demo(
    task: str,
    out: Path,
    *,
    size: ModalityDemoSize | None = None,
    show_progress: bool = True,
    force: bool = False,
) -> DemoResult:
    """The angiography or ultrasound demo: generate DICOM runs / cines, train ``unet2d``, segment the held-out ones.

    Angiography: vessel-tree XA runs (:mod:`medseg.data.demo_xa`) subtracted by the XA adapter (automatic mask
    frames and registration), vessels segmented on their minimum-intensity projections. Ultrasound: fan-shaped cines
    (:mod:`medseg.data.demo_us`) cropped to their region, the chamber segmented frame by frame, the masks pasted
    back onto the full screen (:func:`medseg.inference.planar.source_mask`) and scored there.

    Args:
        task: ``"angiography"`` or ``"ultrasound"``.
        out: the demo's run directory.
        size: data and training size (default :class:`ModalityDemoSize`).
        show_progress: show a progress bar while training.
        force: replace an earlier demo run in ``out``.

    Returns:
        The result; ``evaluation`` holds ``mean_dice`` and ``per_case`` Dice of the held-out cases.
    """
    from medseg.core.config import validate_config
    from medseg.data.demo_us import USSettings, write_us_dataset
    from medseg.data.demo_xa import XASettings, write_xa_dataset
    from medseg.inference.planar import source_mask
    from medseg.io import save_mask

    if task not in ("angiography", "ultrasound"):
        raise ConfigError(f"unknown demo task {task!r}", expected=f"one of {DEMO_TASKS}")
    start = time.perf_counter()
    size = size or ModalityDemoSize()
    out = Path(out)
    _clear_out(out, force)
    rows, cols = size.frame
    if task == "angiography":
        settings_xa = XASettings(rows=rows, columns=cols, frames=size.frames, contrast_frame=max(2, size.frames // 3))
        train_root, heldout_root = write_xa_dataset(out / "data", size.n_train, size.n_heldout, settings_xa)
        roi = (cols, rows)
    else:
        settings_us = USSettings(rows=rows, columns=int(cols * 4 / 3), frames=size.frames)
        train_root, heldout_root = write_us_dataset(out / "data", size.n_train, size.n_heldout, settings_us)
        roi = (64, 64)  # a multiple of the unet2d card's divisor (64), which `medseg train` checks
    config_path = out / "data" / "demo_config.yaml"
    config_path.write_text(validate_config(_modality_config(task, size, roi)).to_yaml())
    train(TrainRequest(data=train_root, config=config_path, out=out, show_progress=show_progress))
    predictor = open_predictor(out)
    truth = json.loads((heldout_root / "truth.json").read_text())
    masks, overlays, per_case = [], [], {}
    for case, info in sorted(truth.items()):
        if task == "angiography":
            image = load_image(info["dicom"], modality_options={"derive": "minip"})
            prediction = predictor.predict(image)
            reference = np.asarray(load_image(heldout_root / "labels" / f"{case}.nii.gz")[0])
            mask = prediction.mask
            per_case[case] = _dice(np.asarray(mask), reference)
        else:
            prediction = predictor.predict(info["dicom"])
            mask = prediction.mask
            full = source_mask(mask, prediction.image.meta)  # back onto the whole screen
            per_case[case] = _dice(np.asarray(full), np.load(info["truth"]))
        masks.append(save_mask(mask, prediction.image, out / "predictions" / f"{case}.nii.gz"))
        overlays.append(
            save_overlay(
                prediction.image,
                mask.long(),
                out / "overlays" / f"{case}.png",
                predictor.label_names,
                title=f"{case}: unet2d prediction (Dice {per_case[case]:.3f})",
            )
        )
    report = {
        "task": task,
        "mean_dice": float(np.mean(list(per_case.values()))),
        "per_case": per_case,
        "path": str(out / "evaluation" / "heldout.json"),
    }
    (out / "evaluation").mkdir(parents=True, exist_ok=True)
    (out / "evaluation" / "heldout.json").write_text(json.dumps(report, indent=2))
    logger.info("%s demo: held-out mean Dice %.4f", task, report["mean_dice"])
    return DemoResult(out, masks, overlays, report, time.perf_counter() - start)


#: The real Aperio slide of the test-data cache (``make install`` fetches it); without it the demo uses ``ihc.png``.
DEMO_SLIDE = Path(__file__).resolve().parent.parent / ".cache" / "test-data" / "cmu_small_region.svs"


@dataclass(frozen=True)
class HistologyDemoSize:
    """How long the histology demo trains.

    The full-width MedViTV2-tiny trains too slowly on 2 CPU cores for a demo of minutes (its pure-PyTorch
    neighbourhood attention dominates), so the default trains the narrow test width of the same architecture
    (``tiny_overrides("medvit2_tiny")``) for 90 steps; ``tiny=False`` trains the full network.

    Attributes:
        epochs, iters_per_epoch, batch_size: training length.
        lr: peak learning rate (AdamW, cosine decay).
        tiny: the narrow width of ``medvit2_tiny`` (``tiny_overrides``) instead of the full network.
    """

    epochs: int = 6
    iters_per_epoch: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    tiny: bool = True


#: A test-sized histology demo (well under a minute on 2 cores).
TINY_HISTOLOGY_DEMO = HistologyDemoSize(epochs=4, iters_per_epoch=15, batch_size=8, tiny=True)


def run_histology_demo(
    out: Path,
    *,
    size: HistologyDemoSize | None = None,
    slide: Path | None = DEMO_SLIDE,
    show_progress: bool = True,
    force: bool = False,
) -> DemoResult:
    """The histology demo: tissue vs background tiles of a real slide (:mod:`medseg.data.slide_demo`; the real SVS
    when ``slide`` exists, else ``ihc.png`` on glass), ``medvit2_tiny`` trained on the left part of the slide, scored on
    the held-out right part (accuracy, AUROC), and the whole slide predicted into a heatmap overlay.

    Returns:
        The result; ``evaluation`` holds ``accuracy``, ``auroc`` and the rest of ``medseg evaluate``'s report,
        ``overlays`` the heatmap overlay, ``masks`` the slide's heatmap TIFF.
    """
    from medseg.core.config import validate_config
    from medseg.data.slide_demo import write_histology_demo
    from medseg.data.slide_inference import predict_slide_file
    from medseg.models import tiny_overrides

    start = time.perf_counter()
    size = size or HistologyDemoSize()
    out = Path(out)
    _clear_out(out, force)
    data = write_histology_demo(out / "data", svs=slide)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_overrides("medvit2_tiny").items()}
    config = {
        "name": "demo_histology",
        "data": {"val_fraction": 0.2},
        "model": {"name": "medvit2_tiny", "roi_size": [128, 128], "kwargs": kwargs if size.tiny else {}},
        "train": {
            "epochs": size.epochs, "iters_per_epoch": size.iters_per_epoch, "batch_size": size.batch_size,
            "lr": size.lr, "weight_decay": 0.05, "warmup_iters": 0, "val_every": size.epochs, "seed": 0,
        },
    }  # fmt: skip
    config_path = out / "data" / "demo_config.yaml"
    config_path.write_text(validate_config(config).to_yaml())
    train(TrainRequest(data=data.root, config=config_path, out=out, show_progress=show_progress))
    report = evaluate(out, data.root)
    report["source"], report["tiles"] = data.source, data.counts
    mpp = 1.0 if data.source == "svs" else 0.5
    result = predict_slide_file(open_predictor(out), data.slide, out / "slide", target_mpp=mpp)
    report["slide"] = str(result.files["summary"])
    logger.info("histology demo: held-out accuracy %.4f, AUROC %s", report["accuracy"], report["auroc"])
    files = result.files
    return DemoResult(out, [files["heatmap_tiff"]], [files["overlay"]], report, time.perf_counter() - start)
