"""Run nnU-Net v2 end to end on a medseg dataset: export -> fingerprint/plan/preprocess -> train (-> validate).

Everything goes through nnunetv2's Python API with the three nnU-Net folders under one work directory::

    work_dir/nnUNet_raw/DatasetXXX_Name/            (export_nnunet_raw)
    work_dir/nnUNet_preprocessed/DatasetXXX_Name/   (fingerprint, nnUNetPlans.json, preprocessed cases)
    work_dir/nnUNet_results/DatasetXXX_Name/{Trainer}__nnUNetPlans__{configuration}/fold_X/

Paths without environment variables: nnU-Net takes its folders from ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results``. nnunetv2 2.8 reads them lazily (``nnunetv2.paths`` holds objects that look the variable up each
time a path is built); older 2.x releases copied them into module constants at import. :func:`nnunet_paths` covers
both: for the duration of a run it sets the three variables in ``os.environ`` (child processes that nnU-Net spawns
inherit them) and rebinds any string constant that already-imported nnunetv2 modules hold, then restores
everything. The user never sets a variable; one consequence is that runs in one process must not overlap.

nnU-Net starts worker pools with the ``spawn`` method (fingerprinting, preprocessing, export of the final
validation), which re-imports the caller's main module: a script calling :func:`run_nnunet` must do so under
``if __name__ == "__main__":`` (the ``medseg`` command and pytest do).

A small CPU budget (tests, smoke runs) is set with ``epochs``, ``iterations_per_epoch`` and
:class:`NnUNetRunSettings` (validation iterations, worker processes, a cap on the default network's widths,
batch size, skipping the final validation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.core.errors import ConfigError
from medseg.integrations.nnunet.export import export_nnunet_raw, find_dataset_folder
from medseg.integrations.nnunet.shim import ensure_nnunet_importable

logger = logging.getLogger(__name__)

__all__ = ["MODEL_TRAINERS", "NnUNetRunSettings", "nnunet_paths", "run_nnunet", "trainer_name_for"]

#: ``model`` names of :func:`run_nnunet` and the nnU-Net trainer each one trains with.
MODEL_TRAINERS: dict[str, str] = {
    "nnunet": "nnUNetTrainer",
    "stunet_s": "STUNetTrainer_small",
    "stunet_b": "STUNetTrainer_base",
    "stunet_l": "STUNetTrainer_large",
    "stunet_h": "STUNetTrainer_huge",
    "stunet_tiny": "STUNetTrainer_tiny",
}
_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_PLANS = "nnUNetPlans"
_SOURCE_KEY = "medseg_source"


@dataclass(frozen=True)
class NnUNetRunSettings:
    """Less common options of :func:`run_nnunet`.

    Attributes:
        name: dataset name of the export (default: the source's name).
        val_iterations_per_epoch: validation iterations per epoch (nnU-Net: 50).
        num_processes: worker processes for fingerprinting, preprocessing and the final validation's export.
        augmentation_processes: data-augmentation workers during training (``None``: nnU-Net's choice, up to 12;
            ``0``: augment in the main process).
        max_features: cap the default network's ``features_per_stage`` in the plans (nnU-Net: 32..320); STU-Net
            widths come from the trainer and ignore it.
        batch_size: override the planned batch size.
        validate: run nnU-Net's final validation (sliding window with mirroring over the fold's validation cases,
            written to ``fold_X/validation/summary.json``).
        pretrained_weights: an STU-Net checkpoint to fine-tune from (official rules: heads re-initialised, stem
            repeated for multi-channel input; see :func:`medseg.models.stunet.load_stunet_checkpoint`), or an
            nnU-Net checkpoint of the same architecture for other trainers.
    """

    name: str | None = None
    val_iterations_per_epoch: int | None = None
    num_processes: int = 2
    augmentation_processes: int | None = None
    max_features: int | None = None
    batch_size: int | None = None
    validate: bool = True
    pretrained_weights: Path | None = None


def trainer_name_for(model: str) -> str:
    """The nnU-Net trainer class name for a ``model`` name (``stunet_s`` -> ``STUNetTrainer_small``).

    A name that is not in :data:`MODEL_TRAINERS` but looks like a class name (``nnUNetTrainer_250epochs``,
    ``STUNetTrainer_base_ft``) is taken as the trainer itself.

    Raises:
        ConfigError: an unknown lowercase model name (with suggestions).
    """
    if model in MODEL_TRAINERS:
        return MODEL_TRAINERS[model]
    if model[:1].isalpha() and model != model.lower() and model.isidentifier():
        return model
    import difflib

    close = difflib.get_close_matches(model, list(MODEL_TRAINERS), n=3)
    raise ConfigError(
        f"unknown nnU-Net model {model!r}",
        expected=f"one of {', '.join(MODEL_TRAINERS)} or an nnU-Net trainer class name",
        hint=f"did you mean {', '.join(close)}?" if close else "e.g. --model stunet_s or --model nnUNetTrainer",
    )


@contextlib.contextmanager
def nnunet_paths(raw: Path, preprocessed: Path, results: Path, *, num_processes: int | None = None) -> Iterator[None]:
    """Point nnU-Net at three folders (and a worker count) for the duration of the block, then restore.

    Args:
        raw: the ``nnUNet_raw`` folder.
        preprocessed: the ``nnUNet_preprocessed`` folder.
        results: the ``nnUNet_results`` folder.
        num_processes: worker count for the pools nnU-Net sizes from ``nnUNet_def_n_proc`` (read at import time,
            so the imported module constants are rebound too).
    """
    values = dict(zip(_PATH_VARS, (str(raw), str(preprocessed), str(results)), strict=True))
    env = dict(values)
    if num_processes is not None:
        env["nnUNet_def_n_proc"] = str(num_processes)
    saved_attrs: list[tuple[Any, str, Any]] = []
    with _environ(env):
        try:
            for name, module in list(sys.modules.items()):
                if not name.startswith("nnunetv2") or module is None:
                    continue
                for var, value in values.items():  # nnunetv2 < 2.8 bound the paths as plain strings at import time
                    if isinstance(getattr(module, var, 0), str | type(None)):
                        saved_attrs.append((module, var, getattr(module, var)))
                        setattr(module, var, value)
                if num_processes is not None and isinstance(getattr(module, "default_num_processes", None), int):
                    saved_attrs.append((module, "default_num_processes", module.default_num_processes))
                    module.default_num_processes = num_processes
            yield
        finally:
            for module, var, old in reversed(saved_attrs):
                setattr(module, var, old)


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_nnunet(
    data_dir: str | Path,
    work_dir: str | Path,
    *,
    model: str = "stunet_s",
    dataset_id: int = 501,
    configuration: str = "3d_fullres",
    fold: int | str = 0,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    device: str = "cpu",
    settings: NnUNetRunSettings | None = None,
) -> Path:
    """Export a dataset, plan and preprocess it, and train one nnU-Net fold, all under ``work_dir``.

    Re-running on the same ``work_dir`` and ``dataset_id`` reuses the export when it came from the same
    ``data_dir`` (delete ``work_dir/nnUNet_raw/DatasetXXX_*`` to export again); planning and preprocessing are
    repeated, the fold's training starts afresh.

    Args:
        data_dir: any dataset folder medseg reads (MSD, nnU-Net raw, paired).
        work_dir: folder for the nnU-Net raw / preprocessed / results folders (created if missing).
        model: ``stunet_s|b|l|h`` (STU-Net trainers), ``stunet_tiny`` (smoke tests), ``nnunet`` (nnU-Net's default
            network), or any trainer class name.
        dataset_id: nnU-Net dataset id, 1..999.
        configuration: nnU-Net configuration (``3d_fullres``, ``2d``, ``3d_lowres``; STU-Net is 3D only).
        fold: cross-validation fold 0..4 (needs >= 5 training cases) or ``"all"``.
        epochs: training epochs (nnU-Net: 1000).
        iterations_per_epoch: training iterations per epoch (nnU-Net: 250).
        device: ``cpu``, ``cuda`` or ``auto``.
        settings: further options (:class:`NnUNetRunSettings`).

    Returns:
        The results folder ``work_dir/nnUNet_results/DatasetXXX_Name/{Trainer}__nnUNetPlans__{configuration}``,
        ready for :meth:`NnUNetResultsPredictor.from_folder`.

    Raises:
        ConfigError: bad id, model, fold, configuration or budget; an export of another dataset already in
            ``work_dir`` under this id.
        DataError: the dataset cannot be exported (see :func:`export_nnunet_raw`).

    Examples::

        >>> folder = run_nnunet("Task04_Hippocampus", "work", model="stunet_s", epochs=50)
        >>> NnUNetResultsPredictor.from_folder(folder).predict("case.nii.gz")
    """
    settings = settings or NnUNetRunSettings()
    _check_budget(epochs, iterations_per_epoch, settings)
    trainer_name = trainer_name_for(model)
    work = Path(work_dir).resolve()
    raw, preprocessed, results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    dataset = _export_or_reuse(Path(data_dir), raw, dataset_id, settings.name)
    _check_fold(fold, dataset)

    ensure_nnunet_importable()
    from medseg.core.device import pick_device
    from medseg.integrations.nnunet.trainers import find_trainer_class

    trainer_class = find_trainer_class(trainer_name)
    torch_device = pick_device(device)
    # nnUNet_n_proc_DA only around training: the planner also sizes torch threads with it, and 0 breaks that.
    augmentation = (
        {} if settings.augmentation_processes is None else {"nnUNet_n_proc_DA": str(settings.augmentation_processes)}
    )
    with nnunet_paths(raw, preprocessed, results, num_processes=settings.num_processes):
        plans = _plan_and_preprocess(dataset_id, preprocessed / dataset.name, configuration, settings)
        dataset_json = json.loads((preprocessed / dataset.name / "dataset.json").read_text(encoding="utf-8"))
        trainer = trainer_class(
            plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=torch_device
        )
        _apply_budget(trainer, epochs, iterations_per_epoch, settings)
        if settings.pretrained_weights is not None:
            _load_pretrained(trainer, Path(settings.pretrained_weights))
        logger.info("training %s on %s, %s fold %s (%s)", trainer_name, dataset.name, configuration, fold, device)
        with _environ(augmentation):
            trainer.run_training()
        if settings.validate:
            trainer.perform_actual_validation(False)
        return Path(trainer.output_folder_base)


# ----------------------------------------------------------------------------------------------------- steps


def _check_budget(epochs: int | None, iterations: int | None, settings: NnUNetRunSettings) -> None:
    for what, value, low in (
        ("epochs", epochs, 1),
        ("iterations_per_epoch", iterations, 1),
        ("val_iterations_per_epoch", settings.val_iterations_per_epoch, 1),
        ("num_processes", settings.num_processes, 1),
        ("augmentation_processes", settings.augmentation_processes, 0),
        ("max_features", settings.max_features, 1),
        ("batch_size", settings.batch_size, 1),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{what} is {value!r}", expected=f"an integer >= {low}")


def _check_fold(fold: int | str, dataset: Path) -> None:
    if fold == "all":
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold <= 4:
        raise ConfigError(f"fold is {fold!r}", expected="0, 1, 2, 3, 4 or 'all'")
    n = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["numTraining"]
    if n < 5:
        raise ConfigError(
            f"{dataset.name} has {n} training case(s), too few for nnU-Net's 5-fold cross-validation",
            expected="at least 5 labelled cases for folds 0-4",
            hint="train fold 'all' (every case trains and validates)",
        )


def _export_or_reuse(data_dir: Path, raw: Path, dataset_id: int, name: str | None) -> Path:
    existing = find_dataset_folder(raw, dataset_id)
    source = str(data_dir.resolve())
    if existing is None:
        folder = export_nnunet_raw(data_dir, raw, dataset_id, name)
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        meta[_SOURCE_KEY] = source  # nnU-Net ignores unknown keys; this lets a re-run reuse the export
        (folder / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder
    meta = json.loads((existing / "dataset.json").read_text(encoding="utf-8"))
    if meta.get(_SOURCE_KEY) != source:
        raise ConfigError(
            f"{existing} holds another dataset ({meta.get(_SOURCE_KEY, 'not exported by medseg')})",
            expected=f"dataset id {dataset_id} free in {raw}, or exported from {source}",
            hint="choose another --id or --work-dir",
            path=existing,
        )
    logger.info("reusing the nnU-Net export %s of %s", existing, source)
    return existing


def _plan_and_preprocess(
    dataset_id: int, preprocessed: Path, configuration: str, settings: NnUNetRunSettings
) -> dict[str, Any]:
    """Fingerprint, plan (default planner), edit the plans for the budget, preprocess; returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    n = settings.num_processes
    extract_fingerprint_dataset(dataset_id, num_processes=n, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiment_dataset(dataset_id)
    plans_file = preprocessed / f"{_PLANS}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if configuration not in plans["configurations"]:
        raise ConfigError(
            f"nnU-Net did not plan a {configuration!r} configuration for {preprocessed.name}",
            expected=f"one of {', '.join(plans['configurations'])}",
            hint="3d_lowres is only planned for large images",
        )
    config = plans["configurations"][configuration]
    if settings.batch_size is not None:
        config["batch_size"] = settings.batch_size
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    if settings.max_features is not None and "features_per_stage" in arch:
        arch["features_per_stage"] = [min(int(f), settings.max_features) for f in arch["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=4), encoding="utf-8")
    preprocess_dataset(dataset_id, _PLANS, (configuration,), (n,), verbose=False)
    plans["continue_training"] = False  # nnUNetTrainer pops this key
    return plans


def _apply_budget(trainer: Any, epochs: int | None, iterations: int | None, settings: NnUNetRunSettings) -> None:
    # The trainer reads these in on_train_start / configure_optimizers (PolyLR spans num_epochs), after __init__.
    if epochs is not None:
        trainer.num_epochs = epochs
    if iterations is not None:
        trainer.num_iterations_per_epoch = iterations
    if settings.val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = settings.val_iterations_per_epoch


def _load_pretrained(trainer: Any, path: Path) -> None:
    from medseg.integrations.nnunet.trainers import STUNetTrainer

    trainer.initialize()
    if isinstance(trainer, STUNetTrainer):
        from medseg.models.stunet import load_stunet_checkpoint

        load_stunet_checkpoint(trainer.network, path, finetune=True)
    else:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

        load_pretrained_weights(trainer.network, str(path), verbose=False)
