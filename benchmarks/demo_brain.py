"""Demo brain task benchmark: SegFormer3D vs a MONAI UNet baseline under the same CPU training budget.

Runs the demo's data generation once, then trains each network with the demo config (same patches, steps,
optimiser, seed), predicts the two held-out subjects and prints, per network: parameters, seconds per training
step, whole-subject inference latency, peak RSS, held-out Dice per label, and ratios against the baseline.
Writes the table to ``benchmarks/results/demo-cpu.md`` with a description of the machine.

Usage::

    .venv/bin/python benchmarks/demo_brain.py [--epochs N] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import time
from pathlib import Path

import torch
from monai.networks.nets import UNet
from monai.utils import set_determinism

from medseg.core.config import load_config
from medseg.data import load_manifest, split_cases
from medseg.data.demo_brain import LABEL_NAMES, write_demo_dataset
from medseg.inference import Predictor
from medseg.inference.rundir import RunDir
from medseg.models import count_parameters, create_model, get_card
from medseg.training import Trainer
from pipelines.predict import evaluate

ROOT = Path(__file__).resolve().parents[1]


def monai_unet_baseline() -> torch.nn.Module:
    """MONAI UNet 16–256 with 2 residual units (the anchor network of the CPU timings)."""
    model = UNet(3, 1, len(LABEL_NAMES), channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    model.card = get_card("unet").replace(  # type: ignore[assignment]
        name="monai_unet",
        in_channels=1,
        out_channels=3,
        label_names=LABEL_NAMES,
        divisible_by=(16, 16, 16),
        intensity_preset="mri",
        reference_params=None,
        paper="MONAI UNet (Kerfoot et al. 2018)",
    )
    return model


def run(name: str, model: torch.nn.Module, cfg, train_root: Path, heldout: Path, out: Path) -> dict:
    manifest = load_manifest(train_root)
    train_cases, val_cases = split_cases(manifest.cases, cfg.data.val_fraction, seed=cfg.train.seed)
    run_dir = RunDir(out / name)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.config.write_text(cfg.to_yaml())
    trainer = Trainer(cfg, model, [c.as_dict() for c in train_cases], [c.as_dict() for c in val_cases], run_dir.root)
    start = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - start
    predictor = Predictor(trainer.model, cfg, device="cpu")
    image = sorted((heldout / "images").glob("*.nii.gz"))[0]
    predictor.predict(image)  # warm-up
    start = time.perf_counter()
    predictor.predict(image)
    infer_s = time.perf_counter() - start
    report = evaluate(run_dir.root, heldout, run_dir.root / "heldout.json", predictor=predictor)
    return {
        "name": name,
        "params_m": count_parameters(model) / 1e6,
        "s_per_step": train_s / max(1, result.steps),
        "train_s": train_s,
        "infer_s": infer_s,
        "gm": report["per_label"]["gray_matter"]["dice"],
        "wm": report["per_label"]["white_matter"]["dice"],
        "mean": report["mean_dice"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    if args.epochs:
        cfg = cfg.updated({"train": {"epochs": args.epochs}})
    shutil.rmtree(args.out, ignore_errors=True)
    train_root, heldout = write_demo_dataset(args.out / "data")
    rows = []
    for name, build in (
        (
            "segformer3d",
            lambda: create_model("segformer3d", in_channels=1, label_names=LABEL_NAMES, roi_size=(64,) * 3),
        ),
        ("monai_unet (baseline)", monai_unet_baseline),
    ):
        set_determinism(seed=cfg.train.seed)
        rows.append(run(name.split()[0], build(), cfg, train_root, heldout, args.out))
    base = rows[-1]
    lines = [
        f"# Demo brain task, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})",
        "",
        f"Budget: {cfg.train.epochs} epochs × {cfg.train.iters_per_epoch} steps, batch {cfg.train.batch_size}, "
        f"patches {cfg.model.roi_size}, spacing {cfg.data.spacing} mm; held-out = 2 subjects.",
        "",
        "| network | params (M) | s/step | ×baseline | inference (s) | ×baseline | GM Dice | WM Dice | mean Dice "
        "| process peak RSS so far (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f} "
            f"| {r['infer_s']:.2f} | {r['infer_s'] / base['infer_s']:.2f} | {r['gm']:.4f} | {r['wm']:.4f} "
            f"| {r['mean']:.4f} | {r['peak_rss_gib']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "demo-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
