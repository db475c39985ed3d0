"""Promptable 2D zoo benchmark: size, CPU latency, and how well DB-SAM and SAM-UNet learn a real 2D task on CPU.

For each model, in its own process so peak RSS is its own:

* parameters, total and trainable (the paper's freezing), at the registry's full configuration;
* CPU latency of one box-prompted 2D image at the model's input size (DB-SAM 1024², SAM-UNet 256²; median of 2 after a
  warm-up), and peak RSS;
* held-out Dice on brain-tissue slices of the MNI152 template (``medseg.data.demo_brain.write_slice_dataset``: 8
  deformed training subjects, 2 held-out, 12 axial slices each; labels gray / white matter) with box prompts from the
  masks (unjittered at test time), after the same short CPU fine-tune of every model, twice: from random
  initialisation, and after loading a synthetic checkpoint in the official SAM ViT-B layout (random weights: it
  proves the loading path, not a pretrained accuracy). No SAM weights are available offline, so neither run says
  anything about fine-tuning real SAM weights.

DB-SAM is fine-tuned at a 256² input (its SAM core resized the way SAM-UNet resizes SAM: position embedding and
global relative-position tables interpolated) because one training step at 1024² takes tens of seconds on 2 cores;
its latency is measured at 1024². The baseline is a MONAI 2D UNet (``--models unet2d``) trained without prompts
(semantic GM/WM segmentation of whole slices) for the same minutes. Writes ``benchmarks/results/sam-cpu.md`` and
the rows as ``sam-cpu.json`` (``--append`` adds or replaces rows of an earlier run).

Usage::

    .venv/bin/python benchmarks/sam.py [--minutes 3] [--models sam_unet_r34,sam_unet_r50,db_sam] [--skip-training]
        [--inits random,checkpoint] [--out benchmarks/results/sam-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_SIZE = {"db_sam": 256}  # input side used for the CPU fine-tune where it differs from the card's


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_size_and_latency(name: str) -> dict:
    import torch

    from medseg.models import count_parameters, create_model, get_card

    card = get_card(name)
    with torch.device("meta"):
        meta = create_model(name)
    row: dict = {
        "name": name,
        "params_m": count_parameters(meta) / 1e6,
        "trainable_m": _trainable(meta) / 1e6,
        "size": card.roi_size[0],
    }
    del meta
    torch.manual_seed(0)
    model = create_model(name).eval()
    s = card.roi_size[0]
    x = torch.randn(1, 3, s, s)
    box = torch.tensor([[s * 0.25, s * 0.3, s * 0.7, s * 0.8]])
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model(x, boxes=box)
            times.append(time.perf_counter() - start)
    row["latency_s"] = statistics.median(times[1:])
    return row


def fine_tune(name: str, init: str, minutes: float, work: Path) -> dict:
    """Train ``name`` for ``minutes`` of CPU time on the slice task; held-out Dice per label with GT boxes."""
    import torch

    from medseg.core.config import ExperimentConfig
    from medseg.data import load_manifest
    from medseg.data.demo_brain import LABEL_NAMES
    from medseg.models import create_model
    from medseg.models.sam import write_synthetic_sam_checkpoint
    from medseg.training.prompted import PromptTrainer

    kwargs = {"img_size": TRAIN_SIZE[name]} if name in TRAIN_SIZE else {}
    train = load_manifest(work / "data" / "slices_train")
    heldout = load_manifest(work / "data" / "slices_heldout")
    train_cases = [c.as_dict() for c in train.cases]
    heldout_cases = [c.as_dict() for c in heldout.cases]
    base = ExperimentConfig().updated(
        {
            "name": f"{name}_{init}",
            "model": {"name": name, "kwargs": kwargs},
            "train": {
                "batch_size": 4,
                "lr": 1e-4 if init == "checkpoint" else 3e-4,
                "weight_decay": 0.01,
                "warmup_iters": 5,
                "grad_clip": None,
                "max_val_slices": 10_000,
                "device": "cpu",
                "seed": 0,
            },
        }
    )

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(name, **kwargs)
        if init == "checkpoint":
            ckpt = work / "sam_vit_b_synthetic.pth"
            if not ckpt.is_file():
                write_synthetic_sam_checkpoint(ckpt, seed=0)
            model.load_pretrained(ckpt)
        return model

    for stale in (work / f"{name}_{init}_probe", work / f"{name}_{init}"):  # runs of an earlier invocation
        shutil.rmtree(stale, ignore_errors=True)
    # Time steps 3..6 of a probe run, then give the real run the step count that fits the budget.
    stamps: list[float] = []
    probe_cfg = base.updated({"train": {"epochs": 1, "iters_per_epoch": 6}})
    PromptTrainer(
        probe_cfg,
        build(),
        train_cases,
        [],
        work / f"{name}_{init}_probe",
        LABEL_NAMES,
        progress=lambda _info: stamps.append(time.perf_counter()),
    ).fit()
    s_per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
    steps = max(20, int(minutes * 60 / s_per_step))
    cfg = base.updated({"train": {"epochs": 1, "iters_per_epoch": steps}})
    trainer = PromptTrainer(cfg, build(), train_cases, heldout_cases, work / f"{name}_{init}", LABEL_NAMES)
    start = time.perf_counter()
    result = trainer.fit()  # validates on the held-out prompts after its last step
    scores = trainer.run.read_metrics()[-1]
    return {
        "steps": result.steps,
        "s_per_step": s_per_step,
        "train_min": (time.perf_counter() - start) / 60,
        "size": trainer.train_ds.size,
        "gm": scores["val_dice"].get("gray_matter"),
        "wm": scores["val_dice"].get("white_matter"),
        "mean": scores["val_mean_dice"],
        "prompts": len(trainer.val_ds),
    }


def _slices(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from medseg.data import load_manifest
    from medseg.io import load_image

    out = []
    for case in load_manifest(root).cases:
        image = np.asarray(load_image(case.images[0]))[0, :, :, 0].T  # (rows, cols)
        label = np.asarray(load_image(case.label))[0, :, :, 0].T.astype(np.int64)
        out.append((image / 255.0, label))
    return out


def unet2d_baseline(minutes: float, work: Path) -> dict:
    """MONAI 2D UNet, semantic (no prompts), same slices, same CPU minutes, whole-slice Dice per label."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(2, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    row: dict = {"name": "unet2d (MONAI, no prompts)", "size": 256}
    row["params_m"] = row["trainable_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.randn(1, 1, 256, 256)
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    row["latency_s"] = statistics.median(times[1:])
    train, heldout = _slices(work / "data" / "slices_train"), _slices(work / "data" / "slices_heldout")

    def pad(a: np.ndarray) -> np.ndarray:
        r, c = a.shape
        return np.pad(a, ((0, -r % 16), (0, -c % 16)))

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < minutes * 60:
        pick = rng.integers(0, len(train), 4)
        img = torch.from_numpy(np.stack([pad(train[i][0]) for i in pick])[:, None]).float()
        lbl = torch.from_numpy(np.stack([pad(train[i][1]) for i in pick])[:, None])
        loss = loss_fn(model(img), lbl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    dice: dict[int, list[float]] = {1: [], 2: []}
    with torch.no_grad():
        for image, label in heldout:
            logits = model(torch.from_numpy(pad(image))[None, None].float())
            pred = logits[0].argmax(0).numpy()[: label.shape[0], : label.shape[1]]
            for v in dice:
                ref, out = label == v, pred == v
                if ref.any():
                    dice[v].append(2 * (ref & out).sum() / (ref.sum() + out.sum()))
    gm, wm = float(np.mean(dice[1])), float(np.mean(dice[2]))
    run = {"steps": steps, "s_per_step": minutes * 60 / steps, "size": "full", "gm": gm, "wm": wm}
    row["random"] = {**run, "mean": (gm + wm) / 2}
    return row


def measure_one(name: str, minutes: float, work: Path, inits: tuple[str, ...]) -> dict:
    if name == "unet2d":
        row = unet2d_baseline(minutes, work)
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return row
    row = measure_size_and_latency(name)
    for init in inits:
        row[init] = fine_tune(name, init, minutes, work)
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def table(rows: list[dict], minutes: float) -> str:
    lines = [
        f"# Promptable 2D zoo on CPU ({platform.machine()}, 2 cores, fp32)",
        "",
        "Latency: one box-prompted image at the model's input size, batch 1. Dice: held-out brain-tissue slices of the "
        "MNI152 template (2 subjects x 12 axial slices, one GT box per label and slice), after "
        f"{minutes:g} CPU minutes of fine-tuning (batch 4, AdamW, the paper's loss) from random initialisation, and "
        "from a synthetic checkpoint in the official SAM ViT-B layout (random weights; proves the loading path).",
        "",
        "| model | params (M) | trainable (M) | input | latency (s) | ×sam_unet_r50 | peak RSS (GiB) "
        "| train input | init | steps | s/step | GM | WM | mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in rows if r["name"] == "sam_unet_r50"), rows[0])
    for r in rows:
        head = (
            f"| {r['name']} | {r['params_m']:.2f} | {r['trainable_m']:.2f} | {r['size']}² | {r['latency_s']:.2f} "
            f"| {r['latency_s'] / base['latency_s']:.2f} | {r['peak_rss_gib']:.2f} "
        )
        runs = [(k, r[k]) for k in ("random", "checkpoint") if k in r] or [("—", {})]
        for init, t in runs:
            lines.append(
                head + f"| {t.get('size', '—')} | {init} | {t.get('steps', '—')} | {_f(t.get('s_per_step'), 2)} "
                f"| {_f(t.get('gm'))} | {_f(t.get('wm'))} | {_f(t.get('mean'))} |"
            )
    return "\n".join(lines) + "\n"


def _f(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--models", default="sam_unet_r50,sam_unet_r34,db_sam")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "sam_bench")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--inits", default="random,checkpoint", help="random and/or checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sam-cpu.md")
    parser.add_argument("--append", action="store_true", help="keep the other rows of <out>.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        inits = tuple(args.inits.split(",")) if not args.skip_training else ()
        print(json.dumps(measure_one(args.one, args.minutes, args.work, inits)))
        return
    from medseg.data.demo_brain import write_slice_dataset

    if not args.skip_training and not (args.work / "data" / "slices_train").is_dir():
        write_slice_dataset(args.work / "data")
    rows_file = args.out.with_suffix(".json")
    rows = json.loads(rows_file.read_text()) if args.append and rows_file.is_file() else []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--minutes", str(args.minutes), "--work", str(args.work)]
        cmd += ["--inits", args.inits]
        if args.skip_training:
            cmd.append("--skip-training")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        print(json.dumps(row), flush=True)
    text = table(rows, args.minutes)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    rows_file.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
