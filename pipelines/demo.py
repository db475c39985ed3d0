"""``medseg demo``: the MNI152 brain-tissue task end to end, on CPU in minutes.

Writes ten deformed training subjects and two held-out subjects (stored in another voxel orientation), trains
SegFormer3D at 1.5 mm, predicts the held-out subjects, scores them and draws overlays, all under ``runs/demo/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(
                f"{out} already holds a demo run", hint="pass --force to replace it, or --out to write elsewhere"
            )
        if not (out / "config.yaml").is_file() and not (out / "data").is_dir():
            raise ConfigError(f"{out} is not empty and is not a demo run; refusing to replace it", hint="use --out")
        shutil.rmtree(out)
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
