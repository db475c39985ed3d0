"""Angiography and ultrasound through medseg: load / subtract / project times, peak memory, and the demos' Dice.

Generates (with :mod:`medseg.data.demo_xa` / :mod:`medseg.data.demo_us`) a 1024 x 1024 x 60 XA run and a
600 x 800 x 120 (rows x columns x frames) ultrasound cine as DICOM, then times, each in a fresh process so that its
peak RSS (``resource.getrusage``) is its own:

* XA: decode only (``subtract=False``); decode + automatic mask + registration + subtraction (``derive="series"``);
  the same + minimum-intensity projection (``derive="minip"``);
* US: decode + region crop (``load_image``).

Then runs ``medseg demo --task angiography`` and ``--task ultrasound`` (default size unless ``--tiny``) and reports
their held-out Dice. Prints the CPU model and flags first. Usage::

    python benchmarks/modalities.py [--tiny] [--out benchmarks/results/modalities.md]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _measure(queue: mp.Queue, path: str, options: dict) -> None:  # runs in a spawned child
    import torch

    torch.set_num_threads(2)
    from medseg.io import load_image

    start = time.perf_counter()
    image = load_image(path, modality_options=options or None)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    queue.put((seconds, rss, list(image.shape), {k: image.meta.get(k) for k in ("mask_frames", "crop_box")}))


def measure(path: Path, options: dict) -> tuple[float, float, list[int], dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(queue, str(path), options))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="run the demos at the test size")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    from medseg.core.cpu import cpu_info
    from medseg.data.demo_us import USSettings, render_us_cine, write_us_dicom
    from medseg.data.demo_xa import XASettings, render_xa_run, write_xa_dicom
    from pipelines.demo import TINY_DEMO, ModalityDemoSize, run_modality_demo

    cpu = cpu_info().describe()
    lines = [f"CPU: {cpu}", ""]
    print(lines[0], flush=True)
    rows = ["| input | step | seconds | peak RSS (MiB) | output shape |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        run = render_xa_run(XASettings(rows=1024, columns=1024, frames=60, contrast_frame=8), seed=1)
        xa = write_xa_dicom(tmp_path / "xa.dcm", run.frames)
        del run
        print(f"generated the XA run in {time.perf_counter() - t:.1f} s", flush=True)
        for step, options in (
            ("decode", {"subtract": False}),
            ("decode + subtract (auto mask, registration)", {}),
            ("decode + subtract + minIP", {"derive": "minip"}),
        ):
            seconds, rss, shape, _ = measure(xa, options)
            rows.append(f"| XA 1024x1024x60 uint16 | {step} | {seconds:.2f} | {rss:.0f} | {tuple(shape)} |")
            print(rows[-1], flush=True)
        t = time.perf_counter()
        cine = render_us_cine(USSettings(rows=600, columns=800, frames=120), seed=1)
        us = write_us_dicom(tmp_path / "us.dcm", cine)
        del cine
        print(f"generated the US cine in {time.perf_counter() - t:.1f} s", flush=True)
        seconds, rss, shape, _ = measure(us, {})
        rows.append(f"| US 600x800x120 uint8 | decode + region crop | {seconds:.2f} | {rss:.0f} | {tuple(shape)} |")
        print(rows[-1], flush=True)
        size = TINY_DEMO if args.tiny else ModalityDemoSize()
        demo_rows = ["| demo | size | held-out Dice (mean) | per case | seconds |", "|---|---|---|---|---|"]
        for task in ("angiography", "ultrasound"):
            result = run_modality_demo(task, tmp_path / f"demo_{task}", size=size, show_progress=False)
            ev = result.evaluation
            per_case = ", ".join(f"{v:.3f}" for v in ev["per_case"].values())
            label = "tiny" if args.tiny else "default"
            demo_rows.append(f"| {task} | {label} | {ev['mean_dice']:.4f} | {per_case} | {result.seconds:.0f} |")
            print(demo_rows[-1], flush=True)
    lines += rows + [""] + demo_rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Angiography and ultrasound on CPU\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
