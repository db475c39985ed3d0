"""CPU inference speed and memory: medseg's engine against ``nnUNetv2_predict`` on the same network and weights.

Builds (or reuses, under ``--work``) an nnU-Net v2 results folder for the demo brain task (deformed MNI152 subjects
at 1.5 mm, 104x129x111, labels background / GM / WM) with nnU-Net's own 3d_fullres plan (PlainConvUNet 32-320, patch
112x144x112 at 1.5 mm), trained by nnU-Net for ``--iterations`` iterations (CPU training of that plan costs about a
minute per iteration, so the default weights are barely trained: timing and agreement are meaningful, Dice only with
more iterations). On that case one window covers the cropped brain.

``--case mni`` (or ``both``) runs the case the speed goals assume: the MNI152 T1 itself (197x233x189 at 1 mm, its
non-zero box 145x181x155) through a copy of that results folder (``<work>/mni128``) whose ``plans.json`` says patch
128^3 at 1 mm spacing: the same network and weights (a fully convolutional network takes any patch divisible by its
strides), eight 128^3 windows at nnU-Net's step 0.5 for both tools. Then times, each run in a fresh process (so peak
RSS is the run's own):

* ``nnUNetv2_predict --disable_tta`` and (``--mirroring``) with nnU-Net's default mirroring;
* medseg's nnU-Net results predictor through ``nnUNetPredictor`` (``engine=False``) and through medseg's engine,
  for every backend / precision this CPU runs (torch fp32, torch bf16 where native, OpenVINO fp32), and (``--tta``)
  the engine with mirror subsets;

and prints windows x passes, wall time, s/window, the network's GFLOP/s against this CPU's estimated peak, peak RSS,
voxel agreement with nnU-Net's mask, Dice against the reference labels, and ratios against ``nnUNetv2_predict``
(without mirroring, and with it for the mirrored rows). Every engine run also samples its resident memory (VmRSS and
the peak VmHWM from ``/proc/self/status``) after the imports, the model load, the preprocessing (before the first
window), the first window and the export, for a per-stage memory table.
A second table (``--large``) runs a generated 512x512x600 CT with 14 and 105 classes through the dense predictor
(a small network: the table is about the engine's memory, not the network) and reports time and peak RSS.

Usage::

    .venv/bin/python benchmarks/predict_speed.py [--work runs/bench-predict] [--case demo|mni|both] [--iterations 1]
        [--mirroring] [--tta] [--large] [--write benchmarks/results/predict-cpu.md]
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
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    own = _vm()[1]
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"peak_rss_gib": round(own, 2), "largest_child_rss_gib": round(kids, 2)}


def _vm() -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of this process in GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return round(fields.get("VmRSS", 0.0), 3), round(fields.get("VmHWM", 0.0), 3)


def _child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run in this (fresh) process; returns its figures as JSON-friendly values."""
    import torch

    from medseg.core.cpu import configure_threads

    configure_threads()
    stages: dict[str, tuple[float, float]] = {"imports": _vm()}
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
            nnUNet_results=str(Path(args.folder).parents[1]),
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
        if mirror and mirror[0]:  # nnU-Net's array axes (z, y, x) -> --tta-axes (the image's x, y, z)
            options["tta_axes"] = ",".join("xyz"[2 - int(a)] for a in mirror[0].split(","))
    from medseg.integrations.nnunet.shim import ensure_nnunet_importable

    ensure_nnunet_importable()
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401  (imported by the opener anyway: counted here)

    stages["imports"] = _vm()
    predictor = open_predictor(Path(args.folder), device="cpu", **options)
    stages["model load"] = _vm()
    network_s, windows = [0.0], [0]
    engine = getattr(predictor, "engine", None)
    if engine is not None:
        inner = engine.backend

        def timed(x: torch.Tensor) -> torch.Tensor:
            if not windows[0]:
                stages["preprocessing"] = _vm()
            t0 = time.perf_counter()
            y = inner(x)
            network_s[0] += time.perf_counter() - t0
            windows[0] += x.shape[0]
            if "first window" not in stages:
                stages["first window"] = _vm()
            return y

        engine.backend = timed
    mirrors = len(getattr(engine, "mirror_axes", ()) or ()) if engine is not None else 0
    tta = bool(kind.startswith("engine") and mirror and mirror[0])
    load_start = time.perf_counter()
    image = load_image(case)
    result = predictor.predict(image, tta=tta)
    stages["export"] = _vm()
    path = save_mask(result.mask, result.image, out / "case.nii.gz")
    return {
        "wall_s": time.perf_counter() - start,
        "predict_s": time.perf_counter() - load_start,
        "network_s": network_s[0],
        "passes": windows[0],
        "windows": windows[0] // (2**mirrors if tta else 1),
        "stages": stages,
        "mask": str(path),
        **_peak_gib(),
    }


def _run_child(kind: str, args: argparse.Namespace, folder: Path, case: Path, tag: str) -> dict[str, Any]:
    out = Path(args.work) / "out" / tag / kind.replace(":", "_").replace(",", "")
    saved = out / "result.json"
    if args.from_saved:  # rebuild the tables from an earlier (possibly stopped) run
        return json.loads(saved.read_text()) if saved.is_file() else {"error": "not measured"}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", kind, "--work", args.work, "--folder", str(folder)]
    cmd += ["--case-file", str(case), "--out", str(out)]
    print(f"[{time.strftime('%H:%M:%S')}] {tag} {kind}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    saved.write_text(json.dumps(result), encoding="utf-8")
    return result


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


def _mni_folder(args: argparse.Namespace, demo_folder: Path) -> tuple[Path, Path, Path]:
    """The goals' case: a copy of the demo results folder planned for patch 128^3 at 1 mm, and the MNI152 T1.

    Only ``plans.json`` changes (3d_fullres ``patch_size`` and ``spacing``); the network, its strides and the weights
    are the demo folder's (the checkpoint is hard-linked, or copied where links fail). The reference label is the
    argmax of (background, GM, WM) of the template's own tissue maps.
    """
    import nibabel as nib

    from medseg.data.demo_brain import template_paths

    root = Path(args.work).resolve() / "mni128"
    folder = root / "nnUNet_results" / demo_folder.parent.name / demo_folder.name
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(demo_folder / name, folder / name)
    plans = json.loads((demo_folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=[128, 128, 128], spacing=[1.0, 1.0, 1.0])
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        try:
            os.link(demo_folder / "fold_0" / "checkpoint_final.pth", checkpoint)
        except OSError:
            shutil.copy(demo_folder / "fold_0" / "checkpoint_final.pth", checkpoint)
    case, label = root / "case" / "mni_t1.nii.gz", root / "case" / "mni_t1_label.nii.gz"
    if not label.is_file():
        case.parent.mkdir(parents=True, exist_ok=True)
        paths = template_paths()
        shutil.copy(paths["t1"], case)
        gm, wm = (np.asarray(nib.load(paths[k]).dataobj, dtype=np.float32) for k in ("gm", "wm"))
        tissue = np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm]).argmax(0).astype(np.uint8)
        nib.save(nib.Nifti1Image(tissue, nib.load(paths["t1"]).affine), label)
    return folder, case, label


def _warm_openvino(folder: Path) -> None:
    """Convert and cache the OpenVINO model once, untimed (the timed rows read the cached IR)."""
    from medseg import open_predictor

    open_predictor(folder, device="cpu", backend="openvino")


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


def _kinds(args: argparse.Namespace, tag: str, bf16: bool, openvino: bool) -> list[str]:
    """The runs of one case. Mirror axes are nnU-Net's array axes (z, y, x): ``2`` is x, left-right."""
    kinds = ["nnunet_cli", "engine:torch:fp32"]
    if bf16:
        kinds.append("engine:torch:bf16")
    if openvino:
        kinds += ["engine:openvino:fp32"] + (["engine:openvino:bf16"] if bf16 else [])
    if args.tta:
        kinds.append("engine:torch:fp32:2")  # the default precision with the default subset
        if bf16:  # the default subset (x: 2 passes) with bf16: the fast settings against nnU-Net's mirroring
            kinds += ["engine:torch:bf16:2"] + (["engine:openvino:bf16:2"] if openvino else [])
        if tag == "demo":  # all 8 passes (agreement with nnU-Net's mirroring): affordable on the one-window case
            kinds.append("engine:torch:fp32:0,1,2")
    if args.mirroring:  # the longest run last, so that a stopped run keeps the others (see --from-saved)
        kinds.append("nnunet_cli_mirror")
    return kinds


def _describe(kind: str) -> str:
    if kind == "nnunet_cli":
        return "`nnUNetv2_predict --disable_tta`"
    if kind == "nnunet_cli_mirror":
        return "`nnUNetv2_predict` (mirroring, 8 passes)"
    if kind == "native":
        return "medseg, `nnUNetPredictor` end to end (`engine=False`)"
    _, backend, precision, *mirror = kind.split(":")
    axes = {"": "", "2": ", mirror x (2 passes)", "0,1,2": ", mirror x, y, z (8 passes)"}[mirror[0] if mirror else ""]
    return f"engine, {'OpenVINO' if backend == 'openvino' else 'torch'} {precision}{axes}"


def _case_table(
    args: argparse.Namespace, tag: str, folder: Path, case: Path, label: Path, info: Any, openvino: bool
) -> list[str]:
    from medseg.io import load_image

    flops = _window_flops(folder)
    if openvino and not args.from_saved:
        _warm_openvino(folder)
    kinds = _kinds(args, tag, info.native_bf16, openvino)
    results = {k: _run_child(k, args, folder, case, tag) for k in kinds}
    reference = np.asarray(load_image(label))[0]

    def mask_of(kind: str) -> np.ndarray | None:
        return np.asarray(load_image(results[kind]["mask"]))[0] if "mask" in results.get(kind, {}) else None

    nn_plain, nn_mirror = mask_of("nnunet_cli"), mask_of("nnunet_cli_mirror")
    base = results["nnunet_cli"].get("wall_s")
    base_mirror = results.get("nnunet_cli_mirror", {}).get("wall_s")
    header = (
        "| run | wall s | network s | windows x passes | s/pass | GFLOP/s (% of peak) | peak RSS GiB | agree nnU-Net "
        "| Dice | vs `--disable_tta` | vs mirroring |"
    )
    table = [header, "|" + "---|" * 11]
    memory = ["| run | " + " | ".join(_STAGES) + " |", "|" + "---|" * (len(_STAGES) + 1)]
    for kind, r in results.items():
        name = _describe(kind)
        if "error" in r:
            table.append(f"| {name} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        mask = np.asarray(load_image(r["mask"]))[0]
        # Against nnU-Net's mask of the same passes: mirrored over all axes, or none
        # (a subset of axes has no nnU-Net counterpart).
        axes = kind.split(":")[3] if kind.count(":") == 3 else ""
        mirrored = kind == "nnunet_cli_mirror" or axes == "0,1,2"
        nn_mask = nn_mirror if mirrored else (nn_plain if not axes else None)
        agree = f"{float((mask == nn_mask).mean()):.4f}" if nn_mask is not None else "-"
        passes, net_s = r.get("passes", 0), r.get("network_s", 0.0)
        peak = info.peak_gflops("bfloat16" if "bf16" in kind else "float32")
        gflops = flops * passes / net_s / 1e9 if net_s else 0.0
        rss = max(r["peak_rss_gib"], r["largest_child_rss_gib"])
        speed = f"{base / r['wall_s']:.2f}x" if base else "-"
        vs_mirror = f"{base_mirror / r['wall_s']:.2f}x" if base_mirror and (axes or kind.startswith("nnunet")) else "-"
        windows = f"{r.get('windows', 0)} x {passes // max(1, r.get('windows', 1))}" if passes else "-"
        perf = f"{gflops:.0f} ({100 * gflops / peak if peak else 0:.0f} %)" if passes else "-"
        table.append(
            f"| {name} | {r['wall_s']:.1f} | {f'{net_s:.1f}' if passes else '-'} | {windows} | "
            f"{f'{net_s / passes:.2f}' if passes else '-'} | "
            f"{perf} | {rss:.2f} | {agree} | {_dice(mask, reference):.3f} | {speed} | {vs_mirror} |"
        )
        if r.get("stages"):
            cells = [f"{r['stages'][k][0]:.2f} / {r['stages'][k][1]:.2f}" if k in r["stages"] else "-" for k in _STAGES]
            memory.append(f"| {name} | " + " | ".join(cells) + " |")
    title = f"case {case.name} ({tag}), one {'x'.join(str(p) for p in _patch(folder))} window = {flops / 1e9:.0f} GFLOP"
    return [
        "",
        title,
        "",
        *table,
        "",
        "VmRSS / VmHWM (GiB) after each stage:",
        "",
        *memory,
    ]


_STAGES = ("imports", "model load", "preprocessing", "first window", "export")


def _patch(folder: Path) -> list[int]:
    plans = json.loads((folder / "plans.json").read_text())
    return list(plans["configurations"]["3d_fullres"]["patch_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-predict")
    parser.add_argument("--case", choices=("demo", "mni", "both"), default="demo", help="which case(s) to time")
    parser.add_argument("--iterations", type=int, default=1, help="nnU-Net training iterations for the weights")
    parser.add_argument("--mirroring", action="store_true", help="also time nnU-Net's default mirroring (8 passes)")
    parser.add_argument("--tta", action="store_true", help="time the engine's mirror subsets")
    parser.add_argument("--large", action="store_true", help="the 512x512x600 CT memory table")
    parser.add_argument("--large-classes", default="14,105", help="class counts of the large CT table")
    parser.add_argument("--write", default=None, help="write the tables to this Markdown file")
    parser.add_argument("--build-only", action="store_true", help="only build the results folder(s)")
    parser.add_argument("--from-saved", action="store_true", help="print the tables of the last run without running")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--large-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-file", dest="case_path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.case = args.case_path
        print(json.dumps(_child(args.child, args)))
        return
    if args.large_child:
        print(json.dumps(_large_child(args.large_child)))
        return

    from medseg.core.cpu import cpu_info

    info = cpu_info()
    load = os.getloadavg()
    lines = [
        f"CPU: {info.describe()}",
        f"estimated fp32 peak {info.peak_gflops():.0f} GFLOP/s, bf16 {info.peak_gflops('bfloat16'):.0f} GFLOP/s",
        f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]
    folder, case, label = _results_folder(args)
    cases = []
    if args.case in ("mni", "both"):  # first: the case the goals assume
        cases.append(("mni", *_mni_folder(args, folder)))
    if args.case in ("demo", "both"):
        cases.append(("demo", folder, case, label))
    if args.build_only:
        for tag, f, c, _ in cases:
            print(f"{tag}: results folder {f}, case {c}")
        return
    try:
        import openvino  # noqa: F401

        has_openvino = True
    except ImportError:
        has_openvino = False
    for tag, f, c, lab in cases:
        lines += _case_table(args, tag, f, c, lab, info, has_openvino)
        if args.write:  # after each case, so that a stopped run keeps what it measured
            Path(args.write).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.large:
        lines += ["", "| classes | wall s | peak RSS GiB | mask dtype |", "|---|---|---|---|"]
        for row in _large_ct(args):
            if "error" in row:
                lines.append(f"| {row['classes']} | failed: {row['error'][:80]} | | |")
            else:
                lines.append(f"| {row['classes']} | {row['wall_s']} | {row['peak_rss_gib']} | {row['mask_dtype']} |")
    load = os.getloadavg()
    lines.append(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
