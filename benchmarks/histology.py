"""Whole-slide histology on CPU: tiles per second, peak memory of a slide run, MedViTV2 latency and FLOPs, the demo.

Measured in one process unless said otherwise, so the ratios are fair on a shared machine:

* tiles per second of read + Reinhard normalisation + inference at 224 px, batch 16, for MedViTV2-tiny
  (classification) and a MONAI 2D ``UNet`` baseline (channels 16-256, 2 residual units: MONAI's usual 2D config), on
  the tissue tiles of the real slide ``cmu_small_region.svs`` (0.5 um/px); and read + normalise alone;
* peak RSS (``resource.getrusage`` in a spawned child) of ``medseg predict RUN SLIDE`` for a MedViTV2-tiny run on the
  whole real slide (tissue, tiles, inference, heatmap outputs);
* MedViTV2 tiny / small / base / large: parameters, FLOPs and multiply-adds (``torch.utils.flop_counter``, one image
  at 224²) and the median latency of a batch of one over 3 runs;
* ``medseg demo --task histology`` (default size unless ``--tiny``): held-out accuracy, AUROC, seconds.

Prints the CPU model and flags first. Usage::

    python benchmarks/histology.py [--tiny] [--skip-demo] [--out benchmarks/results/histology.md]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SLIDE = REPO / ".cache" / "test-data" / "cmu_small_region.svs"


def _whole_slide(queue: mp.Queue, run: str, slide: str, out: str) -> None:  # a spawned child: its own peak RSS
    import torch

    torch.set_num_threads(2)
    from medseg import open_predictor
    from medseg.data.slide_inference import predict_slide_file

    start = time.perf_counter()
    result = predict_slide_file(open_predictor(run, device="cpu"), slide, out, target_mpp=0.5)
    seconds = time.perf_counter() - start
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, result.tiles))


def _tiles_per_second(slide_path: Path, fn, reps: int = 2) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    import torch

    from medseg.data.histology import StainNormalizer, detect_tissue, iter_tile_batches, make_tile_grid
    from medseg.io.slide import open_slide

    with open_slide(slide_path) as slide:
        grid = make_tile_grid(slide, target_mpp=0.5, tile_size=224, tissue=detect_tissue(slide), min_tissue=0.25)
        reference = slide.read_region(0, int(grid.coords[0, 0]), int(grid.coords[0, 1]), 224, 224)
        norm = StainNormalizer("reinhard").fit(reference)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            with torch.no_grad():
                for batch in iter_tile_batches(slide, grid, batch_size=16, normalizer=norm):
                    fn(batch.tiles)
            times.append(time.perf_counter() - start)
    return len(grid) / min(times), len(grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="run the demo at the test size")
    parser.add_argument("--skip-demo", action="store_true", help="leave the demo out")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    args = parser.parse_args()

    import torch
    from monai.networks.nets import UNet
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.core.config import ExperimentConfig
    from medseg.core.cpu import cpu_info
    from medseg.inference.rundir import RunDir, save_checkpoint
    from medseg.models import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    lines = [f"CPU: {cpu_info().describe()}", f"torch {torch.__version__}, 2 threads", ""]
    print("\n".join(lines), flush=True)
    if not SLIDE.is_file():
        raise SystemExit(f"{SLIDE} is absent: run `make install` first")

    medvit = create_model("medvit2_tiny", label_names=("a", "b")).eval()
    unet = UNet(2, 3, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).eval()
    speed = ["| pipeline (224 px, batch 16) | tiles/s | ratio to read + normalise |", "|---|---|---|"]
    base, n_tiles = _tiles_per_second(SLIDE, lambda t: t)
    for name, fn in (
        ("read + Reinhard only", lambda t: t),
        ("+ MedViTV2-tiny (11.7 M params)", lambda t: torch.softmax(medvit((t - 0.5) / 0.5), 1)),
        ("+ MONAI UNet 2D 16-256 (1.6 M params)", lambda t: torch.softmax(unet((t - 0.5) / 0.5), 1)),
    ):
        rate = base if name.startswith("read") else _tiles_per_second(SLIDE, fn)[0]
        speed.append(f"| {name} | {rate:.1f} | {rate / base:.3f} |")
        print(speed[-1], flush=True)
    speed.append(f"\n{n_tiles} tissue tiles of the real slide at 0.5 um/px; best of 2 passes.")

    variants = [
        "| MedViTV2 | params | GFLOPs @224 | GMACs @224 | median latency, batch 1 (ms) |",
        "|---|---|---|---|---|",
    ]
    x = torch.randn(1, 3, 224, 224)
    for size in ("tiny", "small", "base", "large"):
        net = create_model(f"medvit2_{size}", out_channels=1000).eval()
        params = sum(p.numel() for p in net.parameters()) / 1e6
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                net(x)
            net(x)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        gflops, ms = counter.get_total_flops() / 1e9, statistics.median(times) * 1e3
        variants.append(f"| {size} | {params:.2f} M | {gflops:.2f} | {gflops / 2:.2f} | {ms:.0f} |")
        print(variants[-1], flush=True)
        del net
    variants.append("\nOne image, 1000-class head; FLOPs as torch.utils.flop_counter totals them (2 per multiply-add).")

    memory = ["| whole-slide run | seconds | peak RSS (MiB) | tiles |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run.checkpoints.mkdir(parents=True)
        config = ExperimentConfig().updated({"model": {"name": "medvit2_tiny", "roi_size": [224, 224]}})
        run.config.write_text(config.to_yaml())
        save_checkpoint({"model": medvit.state_dict(), "card": medvit.card.to_dict(), "model_name": "medvit2_tiny",
                         "model_kwargs": {}}, run.best)  # fmt: skip
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_whole_slide, args=(queue, str(run.root), str(SLIDE), str(Path(tmp) / "out")))
        proc.start()
        seconds, rss, tiles = queue.get()
        proc.join()
        memory.append(f"| MedViTV2-tiny, cmu_small_region.svs at 0.5 um/px (child process) | {seconds:.1f} | "
                      f"{rss:.0f} | {tiles} |")  # fmt: skip
        print(memory[-1], flush=True)

        demo = ["| demo | size | source | held-out tiles | accuracy | balanced acc. | AUROC | seconds |"]
        demo.append("|---|---|---|---|---|---|---|---|")
        if not args.skip_demo:
            from pipelines.demo import TINY_HISTOLOGY_DEMO, HistologyDemoSize, run_histology_demo

            size = TINY_HISTOLOGY_DEMO if args.tiny else HistologyDemoSize()
            result = run_histology_demo(Path(tmp) / "demo", size=size, show_progress=False)
            ev = result.evaluation
            demo.append(
                f"| histology | {'tiny' if args.tiny else 'default'} | {ev['source']} | {ev['n']} | "
                f"{ev['accuracy']:.4f} | {ev['balanced_accuracy']:.4f} | {ev['auroc']:.4f} | {result.seconds:.0f} |"
            )
            print(demo[-1], flush=True)
    lines += speed + [""] + variants + [""] + memory + [""] + demo
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Whole-slide histology on CPU\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
