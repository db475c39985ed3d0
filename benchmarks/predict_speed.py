"""CPU inference speed and memory: medseg's engine against ``nnUNetv2_predict`` on the same network and weights.

Builds (or reuses, under ``--work``) an nnU-Net v2 results folder for the demo brain task (deformed MNI152 subjects,
197x233x189 at 1 mm, labels background / GM / WM) with nnU-Net's own 3d_fullres plan (PlainConvUNet 32-320, patch
128^3), trained by nnU-Net for ``--iterations`` iterations (CPU training of that plan costs about a minute per
iteration, so the default weights are barely trained: timing and agreement are meaningful, Dice only with more
iterations). Then times, each run in a fresh process (so peak RSS is the run's own):

* ``nnUNetv2_predict --disable_tta`` and (``--mirroring``) with nnU-Net's default mirroring;
* medseg's nnU-Net results predictor through ``nnUNetPredictor`` (``engine=False``) and through medseg's engine,
  for every backend / precision this CPU runs (torch fp32, torch bf16 where native, OpenVINO fp32), and (``--tta``)
  the engine with mirror subsets;

and prints windows x passes, wall time, s/window, the network's GFLOP/s against this CPU's estimated peak, peak RSS,
voxel agreement with nnU-Net's mask, Dice against the reference labels, and ratios against ``nnUNetv2_predict``.
A second table (``--large``) runs a generated 512x512x600 CT with 14 and 105 classes through the dense predictor
(a small network: the table is about the engine's memory, not the network) and reports time and peak RSS.

Usage::

    .venv/bin/python benchmarks/predict_speed.py [--work runs/bench-predict] [--iterations 1] [--mirroring] [--tta]
        [--large] [--write benchmarks/results/predict-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 990


# ----------------------------------------------------------------------------------------------- child runs


def _peak_gib() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"peak_rss_gib": round(own, 2), "largest_child_rss_gib": round(kids, 2)}


def _child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run in this (fresh) process; returns its figures as JSON-friendly values."""
    import torch

    from medseg.core.cpu import configure_threads

    configure_threads()
    work, case, out = Path(args.work), Path(args.case), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if kind.startswith("nnunet_cli"):
        from medseg.integrations.nnunet.native import nnunet_predict_main

        (out / "in").mkdir(exist_ok=True)
        shutil.copy(case, out / "in" / "case_0000.nii.gz")
        argv = ["-i", str(out / "in"), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0"]
        argv += ["-device", "cpu", "-npp", "1", "-nps", "1"] + (["--disable_tta"] if kind == "nnunet_cli" else [])
        os.environ.update(
            nnUNet_raw=str(work / "nnUNet_raw"),
            nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
            nnUNet_results=str(work / "nnUNet_results"),
        )
        nnunet_predict_main(argv)
        mask_path = out / "case.nii.gz"
        return {"wall_s": time.perf_counter() - start, "mask": str(mask_path), **_peak_gib()}

    from medseg import open_predictor
    from medseg.io import load_image, save_mask

    options: dict[str, Any] = {"engine": kind != "native"}
    if kind.startswith("engine"):
        _, backend, precision, *mirror = kind.split(":")
        options.update(backend=backend, precision=precision)
    predictor = open_predictor(Path(args.folder), device="cpu", **options)
    network_s, windows = [0.0], [0]
    engine = getattr(predictor, "engine", None)
    if engine is not None:
        inner = engine.backend

        def timed(x: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            y = inner(x)
            network_s[0] += time.perf_counter() - t0
            windows[0] += x.shape[0]
            return y

        engine.backend = timed
        if kind.startswith("engine") and mirror:
            engine.mirror_axes = tuple(int(a) for a in mirror[0].split(",") if a)
    tta = bool(kind.startswith("engine") and mirror and mirror[0])
    load_start = time.perf_counter()
    image = load_image(case)
    result = predictor.predict(image, tta=tta)
    path = save_mask(result.mask, result.image, out / "case.nii.gz")
    return {
        "wall_s": time.perf_counter() - start,
        "predict_s": time.perf_counter() - load_start,
        "network_s": network_s[0],
        "passes": windows[0],
        "mask": str(path),
        **_peak_gib(),
    }


def _run_child(kind: str, args: argparse.Namespace, folder: Path, case: Path) -> dict[str, Any]:
    out = Path(args.work) / "out" / kind.replace(":", "_").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", kind, "--work", args.work, "--folder", str(folder)]
    cmd += ["--case", str(case), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ set-up


def _results_folder(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    from medseg.data.demo_brain import write_demo_dataset
    from medseg.integrations.nnunet import run_nnunet
    from medseg.integrations.nnunet.runner import NnUNetRunSettings

    work = Path(args.work).resolve()
    train, heldout = work / "data" / "brain_train", work / "data" / "brain_heldout"
    if not (train / "dataset.json").is_file():
        write_demo_dataset(work / "data", n_train=5, n_heldout=2, seed=0)
    found = sorted((work / "nnUNet_results").glob("Dataset990_*/nnUNetTrainer__nnUNetPlans__3d_fullres"))
    if found and (found[0] / "fold_0" / "checkpoint_final.pth").is_file():
        folder = found[0]
    else:
        settings = NnUNetRunSettings(
            name="brain", validate=False, val_iterations_per_epoch=1, batch_size=1, augmentation_processes=0
        )
        folder = run_nnunet(
            train, work, model="nnunet", dataset_id=DATASET_ID, fold=0, epochs=1,
            iterations_per_epoch=args.iterations, settings=settings,
        )  # fmt: skip
    case = sorted((heldout / "images").glob("*.nii.gz"))[0]
    return folder, case, heldout / "labels" / case.name


def _window_flops(folder: Path) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg import open_predictor

    predictor = open_predictor(folder, device="cpu")
    net = predictor.engine.model  # type: ignore[attr-defined]
    patch = predictor.engine.roi  # type: ignore[attr-defined]
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(torch.zeros(1, 1, *patch))
    return float(counter.get_total_flops())


def _dice(mask: np.ndarray, ref: np.ndarray, labels: tuple[int, ...] = (1, 2)) -> float:
    out = []
    for v in labels:
        a, b = mask == v, ref == v
        out.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return float(np.mean(out))


def _large_ct(args: argparse.Namespace) -> list[dict[str, Any]]:
    """512x512x600 CT (0.8 x 0.8 x 1.0 mm) through the dense predictor at 1.5 mm with C classes; time and RSS."""
    rows = []
    for classes in (int(c) for c in args.large_classes.split(",")):
        cmd = [sys.executable, __file__, "--large-child", str(classes), "--work", args.work]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            rows.append({"classes": classes, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def _large_child(classes: int) -> dict[str, Any]:
    import torch
    from monai.data import MetaTensor
    from torch import nn

    from medseg.core.config import ExperimentConfig
    from medseg.core.cpu import configure_threads
    from medseg.inference import Predictor
    from medseg.models import ModelCard

    configure_threads()

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.card = ModelCard(
                name="small", task="segmentation", spatial_dims=3, in_channels=1, out_channels=classes,
                roi_size=(128, 128, 128), divisible_by=(1, 1, 1), target_spacing=(1.5, 1.5, 1.5),
                intensity_preset="ct", label_names=tuple(f"c{i}" for i in range(classes)),
            )  # fmt: skip
            self.net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, classes, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    rng = np.random.default_rng(0)
    volume = np.full((512, 512, 600), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:512, :512]
    body = ((xx - 256) ** 2 / 200**2 + (yy - 256) ** 2 / 150**2) < 1
    volume[body] = 40.0
    volume += rng.normal(0, 20, size=(512, 512, 1)).astype(np.float32)
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.diag(torch.tensor([0.8, 0.8, 1.0, 1.0])))
    config = ExperimentConfig().updated({"data": {"preset": "ct", "spacing": [1.5, 1.5, 1.5]}})
    start = time.perf_counter()
    result = Predictor(Small(), config, device="cpu").predict(image)
    return {
        "classes": classes,
        "wall_s": round(time.perf_counter() - start, 1),
        "mask_dtype": str(result.mask.dtype),
        **_peak_gib(),
    }


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-predict")
    parser.add_argument("--iterations", type=int, default=1, help="nnU-Net training iterations for the weights")
    parser.add_argument("--mirroring", action="store_true", help="also time nnU-Net's default mirroring (8 passes)")
    parser.add_argument("--tta", action="store_true", help="time the engine's mirror subsets")
    parser.add_argument("--large", action="store_true", help="the 512x512x600 CT memory table")
    parser.add_argument("--large-classes", default="14,105", help="class counts of the large CT table")
    parser.add_argument("--write", default=None, help="write the tables to this Markdown file")
    parser.add_argument("--build-only", action="store_true", help="only build the results folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--large-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return
    if args.large_child:
        print(json.dumps(_large_child(args.large_child)))
        return

    from medseg.core.cpu import cpu_info
    from medseg.io import load_image

    info = cpu_info()
    lines = [f"CPU: {info.describe()}", f"estimated fp32 peak {info.peak_gflops():.0f} GFLOP/s"]
    folder, case, label = _results_folder(args)
    if args.build_only:
        print(f"results folder: {folder}")
        return
    flops = _window_flops(folder)
    kinds = ["nnunet_cli"] + (["nnunet_cli_mirror"] if args.mirroring else []) + ["native", "engine:torch:fp32"]
    if info.native_bf16:
        kinds.append("engine:torch:bf16")
    try:
        import openvino  # noqa: F401

        kinds += ["engine:openvino:fp32", "engine:openvino:fp32:"]  # the second run reads the cached model
    except ImportError:
        pass
    if args.tta:
        kinds += ["engine:torch:fp32:0", "engine:torch:fp32:0,1", "engine:torch:fp32:0,1,2", "engine:torch:bf16:0,1,2"]
    results = {k: _run_child(k, args, folder, case) for k in kinds}
    reference = np.asarray(load_image(label))[0]

    def mask_of(kind: str) -> np.ndarray | None:
        return np.asarray(load_image(results[kind]["mask"]))[0] if "mask" in results.get(kind, {}) else None

    nn_plain, nn_mirror = mask_of("nnunet_cli"), mask_of("nnunet_cli_mirror")
    base = results["nnunet_cli"].get("wall_s")
    header = (
        "| run | wall s | network s | passes | s/pass | GFLOP/s (% peak) | peak RSS GiB | agree nnU-Net | Dice "
        "| speed-up |"
    )
    table = [header, "|" + "---|" * 10]
    for kind, r in results.items():
        if "error" in r:
            table.append(f"| {kind} | failed: {r['error'][:80]} |" + " |" * 8)
            continue
        mask = np.asarray(load_image(r["mask"]))[0]
        # Against nnU-Net's mask of the same passes: mirrored over all axes, or none.
        # (a subset of axes has no nnU-Net counterpart).
        axes = kind.split(":")[3] if kind.count(":") == 3 else ""
        mirrored = kind == "nnunet_cli_mirror" or axes == "0,1,2"
        nn_mask = nn_mirror if mirrored else (nn_plain if not axes else None)
        agree = float((mask == nn_mask).mean()) if nn_mask is not None else float("nan")
        passes, net_s = r.get("passes", 0), r.get("network_s", 0.0)
        peak = info.peak_gflops("bfloat16" if "bf16" in kind else "float32")
        gflops = flops * passes / net_s / 1e9 if net_s else 0.0
        rss = max(r["peak_rss_gib"], r["largest_child_rss_gib"])
        table.append(
            f"| {kind} | {r['wall_s']:.1f} | {net_s:.1f} | {passes or '-'} | "
            f"{net_s / passes if passes else 0:.2f} | {gflops:.0f} ({100 * gflops / peak if peak else 0:.0f} %) | "
            f"{rss:.2f} | {agree:.4f} | {_dice(mask, reference):.3f} | {base / r['wall_s'] if base else 0:.2f}x |"
        )
    lines += ["", f"case {case.name}, one 128^3 window = {flops / 1e9:.0f} GFLOP", "", *table]
    if args.large:
        lines += ["", "| classes | wall s | peak RSS GiB | mask dtype |", "|---|---|---|---|"]
        for row in _large_ct(args):
            if "error" in row:
                lines.append(f"| {row['classes']} | failed: {row['error'][:80]} | | |")
            else:
                lines.append(f"| {row['classes']} | {row['wall_s']} | {row['peak_rss_gib']} | {row['mask_dtype']} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
