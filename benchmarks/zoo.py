"""3D zoo benchmark: size, speed, memory and how well each network learns the demo brain task on CPU.

For every 3D segmentation model in the registry (or those named with ``--models``), in its own process so peak RSS
is its own: parameters, forward FLOPs at its card ROI (``torch.utils.flop_counter``, 2 FLOPs per MAC), CPU forward
latency at that ROI (median of 2 after a warm-up), peak RSS, and held-out GM/WM Dice on the demo task after the same
CPU training budget in minutes (the step count is set from a short timing run so every schedule completes).
Writes ``benchmarks/results/zoo-cpu.md``; ratios are against ``unet`` (nnU-Net 3d_fullres-like DynUNet).

Usage::

    .venv/bin/python benchmarks/zoo.py [--minutes 5] [--models unet,segformer3d,...] [--skip-training]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PATCH = (64, 64, 64)


def measure_one(name: str, minutes: float, work: Path, train: bool) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.core.config import load_config
    from medseg.data import load_manifest, split_cases
    from medseg.data.demo_brain import LABEL_NAMES
    from medseg.inference import Predictor
    from medseg.inference.rundir import RunDir
    from medseg.models import count_parameters, create_model, get_card
    from medseg.training import Trainer
    from pipelines.predict import evaluate

    card = get_card(name)
    row: dict = {"name": name}
    model = create_model(name, in_channels=1, label_names=LABEL_NAMES).eval()
    row["params_m"] = count_parameters(model) / 1e6
    x = torch.randn(1, 1, *card.roi_size)
    with torch.no_grad():
        # The math attention kernel is counted by FlopCounterMode; the fused CPU kernel is not.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        row["gflops"] = counter.get_total_flops() / 1e9
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    row["roi"] = "×".join(map(str, card.roi_size))
    row["latency_s"] = statistics.median(times[1:])
    del model, x
    if train:
        cfg = load_config(ROOT / "configs" / "demo.yaml")
        cfg = cfg.updated({"model": {"name": name, "roi_size": list(PATCH)}, "name": name})
        manifest = load_manifest(work / "data" / "brain_train")
        train_cases, val_cases = split_cases(manifest.cases, cfg.data.val_fraction, seed=cfg.train.seed)
        # Time steps 3..8 of a short probe run (the first ones pay for caching and allocation).
        probe = create_model(name, in_channels=1, label_names=LABEL_NAMES, roi_size=PATCH)
        probe_cfg = cfg.updated({"train": {"epochs": 1, "iters_per_epoch": 8, "warmup_iters": 1}})
        stamps: list[float] = []
        Trainer(
            probe_cfg,
            probe,
            [c.as_dict() for c in train_cases],
            [],
            work / f"{name}_probe",
            progress=lambda _info: stamps.append(time.perf_counter()),
        ).fit()
        s_per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
        steps = max(20, int(minutes * 60 / s_per_step))
        epochs = 4
        cfg = cfg.updated(
            {"train": {"epochs": epochs, "iters_per_epoch": max(5, steps // epochs), "val_every": epochs}}
        )
        torch.manual_seed(cfg.train.seed)
        model = create_model(name, in_channels=1, label_names=LABEL_NAMES, roi_size=PATCH)
        run = RunDir(work / name)
        run.root.mkdir(parents=True, exist_ok=True)
        run.config.write_text(cfg.to_yaml())
        trainer = Trainer(cfg, model, [c.as_dict() for c in train_cases], [c.as_dict() for c in val_cases], run.root)
        start = time.perf_counter()
        result = trainer.fit()
        row["train_min"] = (time.perf_counter() - start) / 60  # includes caching and the final validation
        row["steps"] = result.steps
        predictor = Predictor(trainer.model, cfg, device="cpu")
        report = evaluate(run.root, work / "data" / "brain_heldout", run.root / "heldout.json", predictor=predictor)
        row["gm"] = report["per_label"]["gray_matter"]["dice"]
        row["wm"] = report["per_label"]["white_matter"]["dice"]
        row["mean"] = report["mean_dice"]
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def table(rows: list[dict], minutes: float) -> str:
    base = next((r for r in rows if r["name"] == "unet"), rows[0])
    lines = [
        f"# 3D zoo on CPU ({platform.machine()}, 2 cores; torch threads default)",
        "",
        f"Training budget: {minutes:g} CPU minutes per network on the demo brain task (1.5 mm, {PATCH} patches, "
        "batch 2, AdamW + warm-up + cosine), held-out = 2 subjects. Latency/FLOPs at each card's ROI, batch 1.",
        "",
        "| model | params (M) | ROI | GFLOPs | ×unet | latency (s) | ×unet | peak RSS (GiB) | steps | GM | WM | mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} | {r['roi']} | {r['gflops']:.1f} "
            f"| {r['gflops'] / base['gflops']:.2f} "
            f"| {r['latency_s']:.2f} | {r['latency_s'] / base['latency_s']:.2f} | {r['peak_rss_gib']:.2f} "
            f"| {r.get('steps', '—')} | {_f(r.get('gm'))} | {_f(r.get('wm'))} | {_f(r.get('mean'))} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--models", default=None, help="comma-separated names (default: every 3D model)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.minutes, args.work, not args.skip_training)))
        return
    from medseg.data.demo_brain import write_demo_dataset
    from medseg.models import get_card, list_models

    names = (
        args.models.split(",")
        if args.models
        else [n for n in list_models() if get_card(n).spatial_dims == 3 and not get_card(n).needs_prompts]
    )
    names = [n for n in names if n not in ("stunet_l", "stunet_h")]  # > 400 M parameters: not for a 2-core CPU
    if not args.skip_training and not (args.work / "data").is_dir():
        write_demo_dataset(args.work / "data")
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--minutes", str(args.minutes), "--work", str(args.work)]
        if args.skip_training:
            cmd.append("--skip-training")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args.minutes)
    print(text)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "zoo-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
