"""Test-time augmentation subsets, precisions and backends on the demo task: Dice and time against full mirroring.

Trains the demo (``medseg demo``: SegFormer3D on the MNI152 brain-tissue task) unless ``--run`` points at an existing
demo run, then predicts the two held-out subjects with medseg's engine under every setting: mirror subsets (none,
one axis, two axes, all three = nnU-Net's 8 passes), float32 and bf16 (where the CPU runs it natively), PyTorch and
OpenVINO (bf16 and OpenVINO: no mirroring, the default subset x, and all axes). Prints per setting: passes per
window, seconds per subject, mean Dice (GM, WM) and its difference from the
float32 full-mirroring reference; a setting is acceptable when it stays within 0.005 Dice of it.

Usage::

    .venv/bin/python benchmarks/tta_subsets.py [--run runs/demo] [--write benchmarks/results/tta-cpu.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SUBSETS: dict[str, tuple[int, ...] | None] = {
    "none": None,
    "x": (0,),
    "y": (1,),
    "z": (2,),
    "x,y": (0, 1),
    "x,z": (0, 2),
    "all": (0, 1, 2),
}


def _dice(mask: np.ndarray, ref: np.ndarray) -> float:
    scores = []
    for v in (1, 2):
        a, b = mask == v, ref == v
        scores.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run (trained here when missing)")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()

    from medseg import open_predictor
    from medseg.core.cpu import configure_threads, cpu_info
    from medseg.inference.engine import mirror_subsets
    from medseg.io import load_image
    from pipelines.demo import run_demo

    configure_threads()
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        run_demo(run, show_progress=False, force=True)
    heldout = run / "data" / "brain_heldout"
    cases = [(load_image(p), np.asarray(load_image(heldout / "labels" / p.name))[0])
             for p in sorted((heldout / "images").glob("*.nii.gz"))]  # fmt: skip
    info = cpu_info()
    settings = [("torch", "fp32")] + ([("torch", "bf16")] if info.native_bf16 else [])
    try:
        import openvino  # noqa: F401

        settings += [("openvino", "fp32")] + ([("openvino", "bf16")] if info.native_bf16 else [])
    except ImportError:
        pass
    rows = []
    reference: float | None = None
    for backend, precision in settings:
        predictor = open_predictor(run, device="cpu", backend=backend, precision=precision)
        window = predictor.window  # type: ignore[attr-defined]
        for name, axes in reversed(SUBSETS.items()):  # "all" first: the reference
            if backend != "torch" or precision != "fp32":
                if name not in ("none", "x", "all"):  # x: the default subset (infer.tta_axes [0])
                    continue
            engine = window.engine(tta=axes is not None)
            if axes is not None:
                engine = dataclasses.replace(engine, mirrors=mirror_subsets(axes))
            predictor.window = _Fixed(window, engine)  # type: ignore[attr-defined]
            start = time.perf_counter()
            dice = []
            for image, ref in cases:
                result = predictor.predict(image)
                dice.append(_dice(np.asarray(result.mask), ref))
            seconds = (time.perf_counter() - start) / len(cases)
            predictor.window = window  # type: ignore[attr-defined]
            mean = float(np.mean(dice))
            if reference is None:
                reference = mean
            rows.append((f"{backend} {precision}", name, len(engine.mirrors), seconds, mean, mean - reference))
            print(rows[-1], flush=True)
    lines = [
        f"CPU: {info.describe()}",
        f"demo run {run}, {len(cases)} held-out subjects; reference: torch fp32, mirroring over all axes",
        "",
        "| backend | mirrored axes | passes | s / subject | mean Dice (GM, WM) | vs reference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {n} | {p} | {s:.1f} | {d:.4f} | {x:+.4f} |" for b, n, p, s, d, x in rows]
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")


class _Fixed:
    """The run's window settings with a fixed engine (mirror subset) whatever ``tta`` the predictor is given."""

    def __init__(self, window: object, engine: object) -> None:
        self._window, self._engine = window, engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._window, name)

    def engine(self, tta: bool | None = None) -> object:
        return self._engine


if __name__ == "__main__":
    main()
