"""Planned training against the hand-written demo config, under the same CPU time budget.

Part 1, the demo task (deformed MNI152 T1 subjects, gray / white matter; ``medseg.data.demo_brain``):

* ``configs/demo.yaml`` (SegFormer3D, hand-tuned: 1.5 mm, 64³ patches, batch 2, 600 steps) — the reference, whose
  measured wall time sets the budget;
* ``medseg train DATA --model segformer3d`` and ``--model unet`` with no config: the plan chooses spacing,
  normalisation, patch and batch; a small file sets only the schedule (steps per epoch, warm-up), so the plan fills
  the rest (the per-field merge), and the number of epochs is chosen so the run fits the reference's wall time at the
  step time measured for the planned patch and batch.

Each run trains in a fresh process (its own peak RSS), then the two held-out subjects are predicted and scored.

Part 2, generated data: a CT-like dataset with mixed spacings (0.6–0.9 mm in plane, 2.5–5 mm slices; HU-like
intensities) and the demo MRI task — the plans for ``unet`` and ``segformer3d``, and a short planned ``unet`` training
on the CT-like data, reporting its validation Dice per epoch (does it converge?).

Prints the CPU model and flags first and writes ``benchmarks/results/plan-cpu.md``. Usage::

    python benchmarks/plan.py [--budget-scale 1.0] [--out runs/bench-plan]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REUSE = False  # --reuse: keep finished runs of an earlier call (their bench.json) instead of training again
SCHEDULE = {"train": {"iters_per_epoch": 25, "warmup_iters": 25, "val_every": 1000}}


def _train_child(
    queue: mp.Queue,
    data: str,
    model: str | None,
    config: str | None,
    epochs: int | None,
    out: str,
    memory_gib: float | None = None,
):
    """Runs in a spawned process: train, then report the result and this process's peak RSS."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from pipelines.train import TrainRequest, train

    start = time.perf_counter()
    result = train(
        TrainRequest(
            Path(data),
            model,
            Path(config) if config else None,
            epochs,
            Path(out),
            show_progress=False,
            memory_gib=memory_gib,
        )
    )
    queue.put(
        {
            "seconds": time.perf_counter() - start,
            "steps": result.steps,
            "best_val": result.best_mean_dice,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )


def train_in_child(
    data: Path,
    model: str | None,
    config: Path | None,
    epochs: int | None,
    out: Path,
    memory_gib: float | None = None,
) -> dict:
    """Train in a fresh process; the figures are kept in ``out/bench.json`` and reused by ``--reuse``."""
    if REUSE and (out / "bench.json").is_file():
        return json.loads((out / "bench.json").read_text())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_train_child,
        args=(queue, str(data), model, str(config) if config else None, epochs, str(out), memory_gib),
    )
    proc.start()
    result = queue.get()
    proc.join()
    (out / "bench.json").write_text(json.dumps(result))
    return result


def step_seconds(model_name: str, patch: tuple[int, ...], batch: int, label_names: tuple[str, ...]) -> float:
    """Seconds of one AdamW step (forward, loss, backward) at ``patch`` × ``batch``, after two warm-up steps."""
    import torch

    from medseg.models import create_model

    model = create_model(model_name, in_channels=1, label_names=label_names, roi_size=patch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *patch)
    times = []
    for i in range(4):
        start = time.perf_counter()
        out = model(x)
        outs = out if isinstance(out, list | tuple) else [out]
        sum(o.float().square().mean() for o in outs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


def heldout_dice(run: Path, heldout: Path) -> dict:
    from pipelines.predict import evaluate

    if REUSE and (run / "heldout.json").is_file():
        report = json.loads((run / "heldout.json").read_text())
    else:
        report = evaluate(run, heldout, run / "heldout.json")
    return {
        "gm": report["per_label"]["gray_matter"]["dice"],
        "wm": report["per_label"]["white_matter"]["dice"],
        "mean": report["mean_dice"],
    }


def write_ct_like(root: Path, n: int = 8, seed: int = 0) -> Path:
    """An MSD-layout CT-like set: a body ellipse (soft tissue, fat rim), a bright 'organ' and a darker 'lesion'."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        inplane = float(rng.uniform(0.6, 0.9))
        dz = float(rng.choice([2.5, 3.0, 5.0]))
        shape = (int(300 * 0.75 / inplane) // 2, int(260 * 0.75 / inplane) // 2, int(180 / dz))
        sp = (inplane * 2, inplane * 2, dz)
        x, y, z = np.meshgrid(*[(np.arange(s) - s / 2) * d for s, d in zip(shape, sp, strict=True)], indexing="ij")
        body = (x / 150) ** 2 + (y / 110) ** 2 < 1
        image = np.full(shape, -1000.0)
        image[body] = -100.0  # fat
        image[(x / 135) ** 2 + (y / 95) ** 2 < 1] = 40.0  # soft tissue
        c = rng.uniform(-20, 20, 3)
        organ = ((x - 40 - c[0]) / 60) ** 2 + ((y - c[1]) / 45) ** 2 + ((z - c[2]) / 55) ** 2 < 1
        lesion = ((x - 50 - c[0]) / 14) ** 2 + ((y - c[1]) / 12) ** 2 + ((z - c[2]) / 14) ** 2 < 1
        image[organ] = 130.0
        image[lesion] = 70.0
        image += rng.normal(0, 15, shape)
        label = np.zeros(shape, np.uint8)
        label[organ] = 1
        label[lesion] = 2
        affine = np.diag([*sp, 1.0])
        case = f"ct_{i:03d}"
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": "CT-like, mixed spacing",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": n,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-scale", type=float, default=1.0, help="scale the reference's steps (and budget)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-plan")
    parser.add_argument("--ct-epochs", type=int, default=8, help="epochs of the CT-like planned training")
    parser.add_argument("--ct-memory-gib", type=float, default=None, help="memory budget of the CT-like plan")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --out (their bench.json)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "plan-cpu.md")
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    import torch
    import yaml

    from medseg.core.config import load_config
    from medseg.core.cpu import cpu_info
    from medseg.data import load_manifest
    from medseg.data.demo_brain import LABEL_NAMES, write_demo_dataset
    from pipelines.plan import plan_dataset

    cpu = cpu_info().describe()
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()}")
    if not args.reuse:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse and (args.out / "data" / "brain_train" / "dataset.json").is_file():
        train_root, heldout = args.out / "data" / "brain_train", args.out / "data" / "brain_heldout"
    else:
        train_root, heldout = write_demo_dataset(args.out / "data")
    demo_cfg = load_config(ROOT / "configs" / "demo.yaml")
    steps = max(1, round(demo_cfg.train.epochs * demo_cfg.train.iters_per_epoch * args.budget_scale))
    epochs = max(1, round(demo_cfg.train.epochs * args.budget_scale))
    reference_cfg = args.out / "demo.yaml"
    reference_cfg.write_text(yaml.safe_dump(demo_cfg.updated({"train": {"epochs": epochs}}).model_dump(mode="json")))
    schedule = args.out / "schedule.yaml"
    schedule.write_text(yaml.safe_dump(SCHEDULE))

    rows = []
    ref = train_in_child(train_root, None, reference_cfg, None, args.out / "demo_config")
    ref |= heldout_dice(args.out / "demo_config", heldout)
    ref_cfg = load_config(args.out / "demo_config" / "config.yaml")
    rows.append(("configs/demo.yaml (segformer3d)", ref_cfg, ref))
    budget = ref["seconds"]
    manifest = load_manifest(train_root)
    for model in ("segformer3d", "unet"):
        run = args.out / f"plan_{model}"
        n_epochs = None
        if not (REUSE and (run / "bench.json").is_file()):
            plan = plan_dataset(manifest, model)
            sec = step_seconds(model, plan.patch_size, plan.batch_size, LABEL_NAMES)
            n_epochs = max(1, int(budget / (sec * SCHEDULE["train"]["iters_per_epoch"])))
        res = train_in_child(train_root, model, schedule, n_epochs, run)
        res |= heldout_dice(run, heldout)
        rows.append((f"plan, --model {model}", load_config(run / "config.yaml"), res))
        print(rows[-1][0], res)
    lines = [
        "# Planned training vs the hand-written demo config (CPU)",
        "",
        f"CPU: {cpu}. torch {torch.__version__}, {torch.get_num_threads()} threads. Load average at the end: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        f"Budget: the reference's wall time ({budget:.0f} s for {steps} steps). Planned runs get as many epochs of "
        f"{SCHEDULE['train']['iters_per_epoch']} steps as fit that time at their measured step time; held-out = 2 "
        "subjects (`evaluate`).",
        "",
        "| run | spacing (mm) | preset | patch | batch | fg ratio | steps | train s | peak RSS (GiB) | GM Dice "
        "| WM Dice | mean Dice | × reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg, r in rows:
        spacing = "image's own" if cfg.data.spacing is None else ", ".join(f"{s:.3g}" for s in cfg.data.spacing)
        rss = "not recorded" if r.get("peak_rss_gib") is None else f"{r['peak_rss_gib']:.2f}"
        lines.append(
            f"| {name} | {spacing} | {cfg.data.preset} | {'×'.join(map(str, cfg.model.roi_size))} | "
            f"{cfg.train.batch_size} | {cfg.train.fg_ratio:.2f} | {r['steps']} | {r['seconds']:.0f} | "
            f"{rss} | {r['gm']:.4f} | {r['wm']:.4f} | {r['mean']:.4f} | "
            f"{r['mean'] / ref['mean']:.3f} |"
        )

    # Part 2: plans on generated data, and a short planned training on the CT-like set
    ct_root = write_ct_like(args.out / "ct_like")
    ct_manifest = load_manifest(ct_root)
    lines += ["", "## Plans on generated data", ""]
    for title, man in (("CT-like, mixed spacing", ct_manifest), ("demo MRI (MNI152 subjects)", manifest)):
        for model in ("unet", "segformer3d"):
            plan = plan_dataset(man, model)
            lines += [f"### {title}: {model}", "", "```", plan.table(), "```", ""]
    run = args.out / "plan_unet_ct"
    ct_schedule = args.out / "schedule_ct.yaml"
    ct_schedule.write_text(yaml.safe_dump({"train": {**SCHEDULE["train"], "val_every": 2}}))
    res = train_in_child(ct_root, "unet", ct_schedule, args.ct_epochs, run, memory_gib=args.ct_memory_gib)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ct_cfg = load_config(run / "config.yaml")
    lines += [
        "### Planned `unet` training on the CT-like set",
        "",
        f"Plan applied: spacing {ct_cfg.data.spacing}, preset {ct_cfg.data.preset}, patch {ct_cfg.model.roi_size}, "
        f"batch {ct_cfg.train.batch_size}. {res['steps']} steps in {res['seconds']:.0f} s, peak RSS "
        + ("not recorded." if res.get("peak_rss_gib") is None else f"{res['peak_rss_gib']:.2f} GiB."),
        "",
        "| epoch | training loss | validation mean Dice |",
        "|---|---|---|",
    ]
    lines += [
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_mean_dice'] if 'val_mean_dice' in h else ''} |"
        for h in history
    ]
    lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
