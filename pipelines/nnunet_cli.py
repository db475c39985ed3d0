"""``medseg nnunet ...``: export to nnU-Net v2, train STU-Net / nnU-Net through nnU-Net, run nnU-Net's own commands.

Mounted by :mod:`pipelines.cli` as ``app.add_typer(nnunet_app, name="nnunet")``. Heavy imports (MONAI, torch,
nnunetv2) happen inside the commands; errors are ``MedsegError`` and are printed by ``pipelines.cli.main``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medseg.core.errors import ConfigError

nnunet_app = typer.Typer(
    name="nnunet",
    help="nnU-Net v2: export a dataset as nnU-Net raw, train STU-Net or nnU-Net with nnU-Net, find the trainers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)


@nnunet_app.command("export")
def export(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD, nnU-Net raw, or images/ + labels/).")],
    dataset_id: Annotated[int, typer.Option("--id", help="nnU-Net dataset id (1-999).")] = 501,
    name: Annotated[str | None, typer.Option("--name", help="Dataset name (default: the source's name).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="nnU-Net raw folder to write into.")] = Path("nnUNet_raw"),
) -> None:
    """Write DATA as nnU-Net v2 raw data: DatasetXXX_Name/ with imagesTr/, labelsTr/, imagesTs/, dataset.json."""
    from medseg.integrations.nnunet.export import export_nnunet_raw

    folder = export_nnunet_raw(data, out, dataset_id, name)
    console.print(f"wrote {folder}")
    console.print(f"next: nnUNetv2_plan_and_preprocess -d {dataset_id} (with nnUNet_raw={out.resolve()})")


@nnunet_app.command("train")
def train(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD, nnU-Net raw, or images/ + labels/).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="stunet_s|b|l|h, nnunet (default network) or a trainer class.")
    ] = "stunet_s",
    dataset_id: Annotated[int, typer.Option("--id", help="nnU-Net dataset id (1-999).")] = 501,
    work_dir: Annotated[
        Path, typer.Option("--work-dir", "-w", help="Folder for nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/.")
    ] = Path("nnunet_work"),
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (nnU-Net: 1000).")] = None,
    iterations: Annotated[
        int | None, typer.Option("--iterations", min=1, help="Training iterations per epoch (nnU-Net: 250).")
    ] = None,
    fold: Annotated[str, typer.Option("--fold", help="Fold 0-4 (5-fold cross-validation) or 'all'.")] = "0",
    configuration: Annotated[str, typer.Option("--configuration", "-c", help="nnU-Net configuration.")] = "3d_fullres",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    processes: Annotated[int, typer.Option("--processes", min=1, help="Worker processes for preprocessing.")] = 2,
    pretrained: Annotated[
        Path | None, typer.Option("--pretrained", help="STU-Net checkpoint to fine-tune from (heads re-initialised).")
    ] = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip nnU-Net's final validation.")] = False,
) -> None:
    """Export DATA, plan and preprocess it, and train one fold with nnU-Net v2 (no environment variables needed)."""
    from medseg.integrations.nnunet.runner import NnUNetRunSettings, run_nnunet

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not known", expected="auto, cpu or cuda")
    settings = NnUNetRunSettings(num_processes=processes, validate=not no_validate, pretrained_weights=pretrained)
    folder = run_nnunet(
        data,
        work_dir,
        model=model,
        dataset_id=dataset_id,
        configuration=configuration,
        fold=parse_fold(fold),
        epochs=epochs,
        iterations_per_epoch=iterations,
        device=device,
        settings=settings,
    )
    console.print(f"results folder: {folder}")
    summary = folder / f"fold_{fold}" / "validation" / "summary.json"
    if summary.is_file():
        console.print(f"validation summary: {summary}")


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@nnunet_app.command("train-native", context_settings=_PASSTHROUGH, add_help_option=False)
def train_native(ctx: typer.Context) -> None:
    """Run nnUNetv2_train with these arguments and medseg's STU-Net trainers visible (e.g. 501 3d_fullres 0 -tr
    STUNetTrainer_small). nnU-Net's paths come from nnUNet_raw / nnUNet_preprocessed / nnUNet_results."""
    from medseg.integrations.nnunet.native import nnunet_train_main

    nnunet_train_main(list(ctx.args))


@nnunet_app.command("predict-native", context_settings=_PASSTHROUGH, add_help_option=False)
def predict_native(ctx: typer.Context) -> None:
    """Run nnUNetv2_predict with these arguments and medseg's STU-Net trainers visible."""
    from medseg.integrations.nnunet.native import nnunet_predict_main

    nnunet_predict_main(list(ctx.args))


@nnunet_app.command("trainer-path")
def trainer_path() -> None:
    """Print the folder to put in nnUNet_extTrainer so that nnUNetv2_train finds -tr STUNetTrainer_*."""
    from medseg.integrations.nnunet import TRAINER_DIR

    print(TRAINER_DIR)  # noqa: T201 - bare output for $(medseg nnunet trainer-path)


def parse_fold(text: str) -> int | str:
    """``"0"``..``"4"`` -> int, ``"all"`` -> ``"all"``; anything else is a ``ConfigError``."""
    if text == "all":
        return "all"
    if text.isdigit() and 0 <= int(text) <= 4:
        return int(text)
    raise ConfigError(f"--fold {text!r} is not a fold", expected="0, 1, 2, 3, 4 or all")
