"""The ``medseg`` command line (typer). Heavy imports happen inside each command so ``medseg --help`` is fast.

Every ``MedsegError`` is printed as one line and exits with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

if TYPE_CHECKING:
    from medseg.inference.prompts import Prompts
    from medseg.models import ModelCard

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: train, predict, evaluate, verify datasets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


def _mount_subcommands() -> None:
    from pipelines.nnunet_cli import nnunet_app

    app.add_typer(nnunet_app, name="nnunet", help="nnU-Net v2: export datasets, train STU-Net / nnU-Net, predict.")


_mount_subcommands()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet or _torchrun_rank() > 0 else logging.INFO
    handler = RichHandler(console=err_console, show_path=debug, show_time=False, markup=False)
    for name in ("medseg", "pipelines"):
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers = [handler]
        lg.propagate = False


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD, nnU-Net raw, or images/ + labels/).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name (see `medseg models`).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Override train.epochs (with --resume: extend the run).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default runs/<name>).")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from checkpoints/last.pt with its saved config.yaml. Only --epochs may "
            "change; a --config, --model or --pretrained that disagrees with the saved run is an error.",
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    pretrained: Annotated[
        list[Path] | None,
        typer.Option(
            "--pretrained",
            help="Local weights to start from, repeatable (SAM models: sam_vit_b_01ec64.pth; sam_unet_*: also an "
            "ImageNet ResNet file).",
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train data-parallel on this many processes of this machine (torchrun; one GPU each on CUDA, "
            "gloo on CPU). train.batch_size stays the global batch.",
        ),
    ] = 1,
    no_plan: Annotated[
        bool,
        typer.Option(
            "--no-plan",
            help="Do not plan from the dataset: use the --config file (or the model card's defaults) as it is. "
            "Without it, the settings the file leaves out (spacing, preset, patch, batch, fg_ratio) are planned.",
        ),
    ] = False,
    configuration: Annotated[
        str,
        typer.Option("--configuration", help="Plan configuration: auto, 3d_fullres, 3d_lowres or 2d."),
    ] = "auto",
    memory_gib: Annotated[
        float | None,
        typer.Option("--memory-gib", min=0.01, help="Plan: memory budget of one training step (GiB)."),
    ] = None,
) -> None:
    """Train a model on a dataset folder into a run directory (prompted SAM models train on box prompts)."""
    if nproc > 1:
        raise typer.Exit(_launch_torchrun(nproc))
    from pipelines.train import TrainRequest
    from pipelines.train import train as run_train

    if model is None and config is None and not resume:  # a resumed run keeps its own model
        model = "segformer3d"
    request = TrainRequest(
        data,
        model,
        config,
        epochs,
        out,
        resume,
        not no_progress,
        tuple(pretrained or ()),
        plan=not no_plan,
        configuration=configuration,
        memory_gib=memory_gib,
    )
    result = run_train(request)
    if _torchrun_rank() > 0:  # rank 0 reports for all
        return
    best = "n/a" if result.best_mean_dice is None else f"{result.best_mean_dice:.4f} (epoch {result.best_epoch})"
    what = "mean Dice"
    if hasattr(result, "best_accuracy"):  # a classifier
        what, acc = "accuracy", result.best_accuracy
        best = "n/a" if acc is None else f"{acc:.4f} (epoch {result.best_epoch})"
    console.print(
        f"trained {result.epochs} epochs / {result.steps} steps in {result.seconds:.0f} s; best val {what} {best}"
    )
    console.print(f"run directory: {result.run_dir}")


def _torchrun_rank() -> int:
    """This process's rank when launched by torchrun (0 otherwise): the other ranks log only warnings."""
    return int(os.environ.get("RANK", "0"))


def _launch_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run this command line again under ``torchrun --standalone --nproc-per-node nproc``, without ``--nproc``;
    returns torchrun's exit status (non-zero when any rank failed: torchrun then stops the others)."""
    import subprocess

    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "pipelines.cli", *kept]
    logging.getLogger("pipelines").info("launching %s", " ".join(command))
    return subprocess.run(command, check=False).returncode  # noqa: S603 - our own interpreter and module


@app.command()
def predict(
    run: Annotated[
        Path,
        typer.Argument(
            help="Model folder: a run directory written by `medseg train`, or an nnU-Net v2 results folder."
        ),
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Images: NIfTI, NRRD, MHA, DICOM folder or zip, PNG/TIFF/JPEG, 2D DICOM; whole slides (.svs, .ndpi, "
            ".mrxs, .scn, pyramidal .tif) give slide-level outputs in <out>/<case>_slide/."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Flip test-time augmentation.")] = None,
    tta_axes: Annotated[
        str | None,
        typer.Option(
            "--tta-axes",
            help="Axes --tta mirrors: x, y, z (comma-separated; every subset is one pass) or all. Default: the run's "
            "(x: 2 passes); nnU-Net folders: every axis the checkpoint allows (8 passes in 3D).",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="nifti, nrrd or png (2D images).")] = "nifti",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    box: Annotated[
        list[str] | None,
        typer.Option("--box", help="Box prompt x0,y0,x1,y1[,z0,z1] (repeat for several objects)."),
    ] = None,
    point: Annotated[
        list[str] | None, typer.Option("--point", help="Point prompt x,y[,z][:label], label 1 (default) or 0.")
    ] = None,
    coords: Annotated[
        str, typer.Option("--coords", help="Prompt coordinates: voxel (indices) or ras (world mm).")
    ] = "voxel",
    allow_external_data: Annotated[
        bool,
        typer.Option(
            "--allow-external-data",
            help="Read detached headers (.nhdr, .mhd, .hdr/.img) whose data file sits in the header's folder.",
        ),
    ] = False,
    num_parts: Annotated[
        int, typer.Option("--num-parts", help="Split the cases into this many parts (one per process or node).")
    ] = 1,
    part_id: Annotated[int, typer.Option("--part-id", help="The part this process predicts, 0 .. num-parts - 1.")] = 0,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Skip cases whose mask and statistics are already in --out.")
    ] = False,
    ray: Annotated[
        bool, typer.Option("--ray", help="Run the cases on Ray (one predictor per worker; needs medseg[ray]).")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="A running Ray cluster; default: a local instance.")
    ] = None,
    ray_workers: Annotated[int, typer.Option("--ray-workers", help="Predictor workers (one CPU each).")] = 2,
    backend: Annotated[
        str | None, typer.Option("--backend", help="Dense models: torch or openvino (needs medseg[openvino]).")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="Dense models: auto, fp32, bf16 (CPUs with native bf16) or fp16 (CUDA)."),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", min=0.01, help="Whole slides: microns per pixel of the tiles (default: the run's, 0.5)."),
    ] = None,
    slide_mpp: Annotated[
        float | None,
        typer.Option("--slide-mpp", min=0.01, help="Whole slides: level-0 microns per pixel when the file has none."),
    ] = None,
    save_probabilities: Annotated[
        str | None,
        typer.Option(
            "--save-probabilities",
            help="Dense 3D models and nnU-Net folders: also write per-class probabilities on the input grid, uint8"
            " (<case>_prob_<class>.nii, p x 255) or float16 (.npy), written slab by slab; none: masks only (default:"
            " the run's).",
        ),
    ] = None,
) -> None:
    """Segment images; masks land on each input's exact voxel grid. Prompted models (db_sam, sam_unet_*) need
    --box and/or --point; 3D volumes are segmented slice by slice over the slices a 3D box spans. A folder of image
    files stands for its cases; --num-parts/--part-id split them (sorted by name, every N-th case) across processes."""
    from pipelines.predict import PredictSettings
    from pipelines.predict import predict as run_predict

    settings = PredictSettings(
        tta=tta,
        tta_axes=tta_axes,
        fmt=fmt,
        prompts=_cli_prompts(box or [], point or [], coords),
        allow_external_data=allow_external_data,
        num_parts=num_parts,
        part_id=part_id,
        skip_existing=skip_existing,
        backend=backend,
        precision=precision,
        target_mpp=mpp,
        slide_mpp=slide_mpp,
        save_probabilities=save_probabilities,
    )
    if ray or ray_address:
        from pipelines.ray_predict import predict_with_ray

        report = predict_with_ray(
            run, inputs, out, settings, address=ray_address, workers=ray_workers, show_progress=not no_progress
        )
        console.print(
            f"{len(report.written)} written, {len(report.skipped)} skipped, {len(report.failed)} failed "
            f"in {report.seconds:.0f} s; report: {out / 'batch_report.json'}"
        )
        for path, error in report.failed.items():
            console.print(f"[red]failed[/red] {path}: {error}", markup=True, highlight=False)
        if report.failed:
            raise typer.Exit(1)
        return
    from medseg.core.cpu import configure_threads

    configure_threads()  # intra-op threads = physical cores, once
    cases = run_predict(run, inputs, out, settings, show_progress=not no_progress)
    for case in cases:
        if "tiles_total" in case.stats:  # a whole slide: its tiles and output folder
            st = case.stats
            console.print(f"{case.input} → {case.mask}/  ({st['task']}, {st['tiles']} tiles)", markup=False)
            continue
        if "label_name" in case.stats:  # a classifier: the class and its probability
            p = case.stats["probabilities"][case.stats["label_name"]]
            console.print(f"{case.input} → {case.stats['label_name']} (p = {p:.3f}), {case.mask}", markup=False)
            continue
        vols = ", ".join(f"{n} {v['volume_ml']:.1f} mL" for n, v in case.stats["labels"].items())
        console.print(f"{case.input} → {case.mask}  ({vols})")


def _cli_prompts(boxes: list[str], points: list[str], coords: str) -> Prompts | None:
    """``Prompts`` from ``--box`` / ``--point`` options, or ``None`` when none was given."""
    if not boxes and not points:
        return None
    from medseg.core.errors import ConfigError
    from medseg.inference.prompts import Prompts

    if coords not in ("voxel", "ras"):
        raise ConfigError(f"--coords {coords!r} is not known", expected="voxel or ras")
    return Prompts.from_cli(boxes, points, space=coords)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Model folder (run directory or nnU-Net v2 results folder).")],
    data: Annotated[Path, typer.Argument(help="Labelled dataset folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON report path.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Predict a labelled dataset and report Dice and HD95 per label."""
    from pipelines.predict import evaluate as run_evaluate

    report = run_evaluate(run, data, out, show_progress=not no_progress)
    if "accuracy" in report:  # a classifier
        table = Table(title=f"evaluation on {report['data']} ({report['split']}, {report['n']} images)")
        for col in ("accuracy", "balanced accuracy", "macro F1", "AUROC"):
            table.add_column(col, justify="right")
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
        table.add_row(*(_fmt(report[k]) for k in keys))
        console.print(table)
        console.print(f"report: {report['path']}")
        return
    console.print(metrics_table(report))
    console.print(f"report: {report['path']}")


def metrics_table(report: dict) -> Table:
    """Rich table of per-label mean Dice / HD95."""
    table = Table(title=f"evaluation on {report['data']} ({len(report['cases'])} cases)")
    metrics = ("dice", "hd95", "accuracy", "precision", "specificity", "iou", "mcc")
    table.add_column("label")
    for metric in metrics:
        table.add_column(
            "HD95 (mm)" if metric == "hd95" else metric.capitalize().replace("Iou", "IoU").replace("Mcc", "MCC"),
            justify="right",
        )
    for name, m in report["per_label"].items():
        table.add_row(name, *(_fmt(m.get(k), 2 if k == "hd95" else 4) for k in metrics))
    table.add_row("[bold]mean[/bold]", _fmt(report["mean_dice"]), *[""] * (len(metrics) - 1))
    return table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


@app.command()
def plan(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD, nnU-Net raw, or images/ + labels/).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Dense model name (see `medseg models`).")],
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto: where memory is probed.")] = "cpu",
    memory_gib: Annotated[
        float | None, typer.Option("--memory-gib", min=0.01, help="Memory budget of one training step (GiB).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="plan.json path (default DATA/plan.json).")] = None,
    configuration: Annotated[
        str,
        typer.Option(
            "--configuration",
            help="auto (2d for 2D models, else 3d_fullres), 3d_fullres, 3d_lowres (nnU-Net's low-resolution rule) "
            "or 2d.",
        ),
    ] = "auto",
) -> None:
    """Fingerprint a dataset and plan training of a model on it: spacing, normalisation, patch, batch."""
    from pipelines.plan import PlanRequest
    from pipelines.plan import plan as run_plan

    if device not in ("cpu", "cuda", "auto"):
        raise typer.BadParameter(f"--device {device!r}: expected cpu, cuda or auto")
    result, path = run_plan(PlanRequest(data, model, device, memory_gib, out, configuration=configuration))
    table = Table(title=f"plan for {result.model} on {result.dataset}")
    table.add_column("setting", no_wrap=True)
    table.add_column("value")
    for key, value in result.rows():
        table.add_row(key, value)
    console.print(table)
    console.print(f"plan: {path}")


@app.command("verify-data")
def verify_data(data: Annotated[Path, typer.Argument(help="Dataset folder.")]) -> None:
    """Check a dataset folder and report every problem at once (exit 1 if any)."""
    from medseg.data import load_manifest, verify_dataset
    from medseg.data.classification import (
        detect_classification_layout,
        load_classification_dataset,
        verify_classification,
    )

    if detect_classification_layout(data):
        dataset = load_classification_dataset(data)
        console.print(dataset.describe())
        _report_problems(verify_classification(dataset))
        return
    manifest = load_manifest(data)
    problems = verify_dataset(manifest)
    console.print(
        f"{manifest.root}: {manifest.layout} layout, {len(manifest.cases)} training / {len(manifest.test_cases)} test "
        f"cases, channels {list(manifest.channel_names)}, labels {list(manifest.label_names) or '(from files)'}"
    )
    _report_problems(problems)


def _report_problems(problems: list) -> None:
    """Print every problem of ``verify-data`` and exit 1, or say there is none."""
    if problems:
        for p in problems:
            console.print(f"[red]✗[/red] {p}", markup=True, highlight=False)
        console.print(f"[red]{len(problems)} problem(s)[/red]")
        raise typer.Exit(1)
    console.print("[green]no problems found[/green]")


def accepted_inputs(card: ModelCard) -> str:
    """What images a model segments: a 2D model takes 2D images and 2D+t cines (frame by frame) and 3D volumes
    (slice by slice); a 3D model takes 3D volumes; a prompted 2D model (one box per slice) is listed as 2D."""
    if card.task != "segmentation":
        return "2D" if card.spatial_dims == 2 else "3D"
    if card.spatial_dims == 2 and not card.needs_prompts:
        return "2D, 2D+t, 3D (per slice)"
    return "2D, 3D (per slice)" if card.spatial_dims == 2 else "3D"


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print the cards as JSON.")] = False) -> None:
    """List the registered models with their cards."""
    from medseg.models import get_card, list_models

    cards = [get_card(n) for n in list_models()]
    if as_json:
        console.print_json(json.dumps([{**c.to_dict(), "accepts": accepted_inputs(c)} for c in cards]))
        return
    table = Table(title="medseg models")
    for col in ("name", "dims", "accepts", "in→out", "roi", "divisible by", "preset", "params (paper)"):
        table.add_column(col, no_wrap=True)
    for c in cards:
        params = f"{c.reference_params / 1e6:.2f} M" if c.reference_params else "—"
        table.add_row(
            c.name,
            f"{c.spatial_dims}D",
            accepted_inputs(c),
            f"{c.in_channels}→{c.out_channels}",
            "×".join(map(str, c.roi_size)),
            "×".join(map(str, c.divisible_by)),
            c.intensity_preset,
            params,
        )
    console.print(table)
    for c in cards:
        console.print(f"  {c.name}: {c.paper}", highlight=False)


@app.command()
def serve(
    models: Annotated[
        Path | None, typer.Option("--models", help="Folder of run dirs / nnU-Net results (default: settings).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    settings: Annotated[Path | None, typer.Option("--settings", help="Server settings YAML.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Disable authentication (loopback only).")] = False,
) -> None:
    """Serve the models over REST, DICOMweb and the MONAI Label protocol (3D Slicer)."""
    from pipelines.serve import serve as run_serve

    run_serve(models, host=host, port=port, settings_file=settings, no_auth=no_auth)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo run directory.")] = Path("runs/demo"),
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Override the demo's epochs.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo run in --out.")] = False,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="brain (SegFormer3D on MNI152), angiography or ultrasound (unet2d), histology (MedViTV2-tiny).",
        ),
    ] = "brain",
) -> None:
    """Train SegFormer3D on MNI152 brain tissue (or unet2d on generated XA / US DICOM) and segment held-out cases."""
    from medseg.core.errors import ConfigError
    from pipelines.demo import DEMO_TASKS, ModalityDemoSize, run_demo, run_modality_demo

    if task not in DEMO_TASKS:
        raise ConfigError(f"--task {task!r} is not a demo task", expected=f"one of {', '.join(DEMO_TASKS)}")
    if task == "histology":
        from pipelines.demo import HistologyDemoSize, run_histology_demo

        out = out if out != Path("runs/demo") else Path("runs/demo_histology")
        size = HistologyDemoSize() if epochs is None else HistologyDemoSize(epochs=epochs)
        result = run_histology_demo(out, size=size, show_progress=not no_progress, force=force)
        ev = result.evaluation
        console.print(
            f"held-out tiles ({ev['source']}, {ev['n']} tiles): accuracy {ev['accuracy']:.4f}, "
            f"AUROC {_fmt(ev['auroc'])}, balanced accuracy {ev['balanced_accuracy']:.4f}"
        )
        console.print(f"demo finished in {result.seconds:.0f} s. Results in {result.run_dir}/:")
        console.print(f"  heatmap overlay: {result.overlays[0]}   heatmap TIFF: {result.masks[0]}")
        console.print(f"  report:   {ev['path']}")
        return
    if task != "brain":
        out = out if out != Path("runs/demo") else Path(f"runs/demo_{task}")
        size = ModalityDemoSize() if epochs is None else ModalityDemoSize(epochs=epochs)
        result = run_modality_demo(task, out, size=size, show_progress=not no_progress, force=force)
        per_case = ", ".join(f"{k} {v:.4f}" for k, v in result.evaluation["per_case"].items())
        console.print(f"held-out Dice ({task}): {per_case}; mean {result.evaluation['mean_dice']:.4f}")
        console.print(f"demo finished in {result.seconds:.0f} s. Results in {result.run_dir}/:")
        console.print(f"  overlays: {', '.join(str(p) for p in result.overlays)}")
        console.print(f"  report:   {result.evaluation['path']}")
        return
    result = run_demo(out, epochs=epochs, show_progress=not no_progress, force=force)
    ev = result.evaluation
    console.print(metrics_table(ev))
    gm, wm = ev["per_label"]["gray_matter"]["dice"], ev["per_label"]["white_matter"]["dice"]
    console.print(f"held-out Dice: gray matter {gm:.4f}, white matter {wm:.4f}, mean {ev['mean_dice']:.4f}")
    console.print(f"demo finished in {result.seconds:.0f} s. Results in {result.run_dir}/:")
    console.print(f"  masks:    {', '.join(str(p) for p in result.masks)}")
    console.print(f"  overlays: {', '.join(str(p) for p in result.overlays)}")
    console.print(f"  curves:   {result.run_dir / 'curves.png'}   metrics: {result.run_dir / 'metrics.jsonl'}")
    console.print(f"  report:   {ev['path']}")


def main() -> None:
    """Entry point: run the app, turning medseg errors into one red line and exit status 1."""
    from medseg.core.errors import MedsegError

    try:
        rc = app(standalone_mode=False)
    except MedsegError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
