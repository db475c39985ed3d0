"""``medseg train``: dataset folder → verified manifest → model → trainer → run directory.

``--resume`` continues the run in ``--out`` with the settings of its ``config.yaml``. Options given with it must agree
with that file (each conflict is named in one ``ConfigError``); only the number of epochs may change
(:data:`RESUME_MAY_CHANGE`): ``--epochs`` extends (or shortens) the run, and the LR schedule is then spread over the
new total from the current step on.

Without ``--config`` a dense model trains with a plan derived from the dataset (:mod:`pipelines.plan`, rules in
``docs/planning.md``): target spacing, intensity preset, patch and batch size, foreground oversampling; the plan is
saved as ``plan.json`` in the run directory. With ``--config`` the settings the file states explicitly win and the plan
fills the rest (``plan.json``'s ``sources`` and the header of the run's ``config.yaml`` say which came from where);
``--no-plan`` uses the file (or the model card's defaults) as it is. Either way a CT preset on a dataset declared as
another modality is refused unless ``data.force_preset`` is set.

Launched by ``torchrun`` (or ``medseg train --nproc N``) every process runs this function: the process group is set
up here (:func:`medseg.training.distributed.process_group`), rank 0 plans and the others receive its plan, and only
rank 0 writes the run directory (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from monai.utils import set_determinism
from torch import nn

from medseg.core.atomic import atomic_open
from medseg.core.config import ExperimentConfig, config_file_keys, load_config
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError, DataError
from medseg.data import Manifest, load_manifest, require_valid, split_cases
from medseg.data.classification import (
    EXPECTED_CLASSIFICATION,
    ClassificationDataset,
    detect_classification_layout,
    load_classification_dataset,
    require_valid_classification,
)
from medseg.data.labels import resolve_label_names
from medseg.models import create_model, get_card
from medseg.training import RunDir, Trainer, TrainResult, distributed
from medseg.training.classification import ClassificationTrainer, prepare_classification
from medseg.training.plan import PLAN_FILE, PLANNED_KEYS, Plan, check_preset_modality, merge_plan
from medseg.training.prompted import PromptTrainer
from pipelines.plan import plan_dataset, write_plan
from pipelines.progress import StepProgress, log_to_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """What the user asked for on the command line (``None`` = keep the config's value)."""

    data: Path
    model: str | None = None
    config: Path | None = None
    epochs: int | None = None
    out: Path | None = None
    resume: bool = False
    show_progress: bool = True
    pretrained: tuple[Path, ...] = ()
    plan: bool = True
    configuration: str = "auto"
    memory_gib: float | None = None


def resolve_config(req: TrainRequest) -> ExperimentConfig:
    """Config file (or defaults) + command-line options."""
    cfg = load_config(req.config) if req.config else ExperimentConfig()
    cfg = cfg.updated(
        {
            "data": {"root": str(req.data)},
            "model": {"name": req.model, "pretrained": [str(p) for p in req.pretrained] or None},
            "train": {"epochs": req.epochs},
        }
    )
    get_card(cfg.model.name)  # unknown model names fail here, with a suggestion
    return cfg


#: Settings a resumed run may change (``--epochs``); every other option must match the run's ``config.yaml``.
RESUME_MAY_CHANGE = frozenset({"train.epochs"})
#: Settings a run fills in when it starts (from the model card or the command line): unset in a config file given
#: with ``--resume``, they state nothing (``--pretrained`` weights are not reloaded on resume: ``last.pt`` holds them).
_FILLED_AT_START = frozenset({"model.roi_size", "data.preset", "model.pretrained", "model.pretrained_sha256"})


def _given_settings(req: TrainRequest) -> dict[str, tuple[str, Any]]:
    """``{"section.key": (option, value)}`` of what the command line states (``--config`` file, ``--model``, ...)."""
    given: dict[str, tuple[str, Any]] = {}
    if req.config:
        stated = config_file_keys(req.config)  # a default the file leaves out states nothing (a plan may fill it)
        for key, value in load_config(req.config).flat().items():
            if key in stated and key != "data.root" and not (key in _FILLED_AT_START and value in (None, [])):
                given[key] = (f"--config {req.config}", value)
    if req.model:
        given["model.name"] = ("--model", req.model)
    if req.pretrained:
        given["model.pretrained"] = ("--pretrained", [str(p) for p in req.pretrained])
    return given


def _same_folder(a: str | Path | None, b: str | Path) -> bool:
    if a is None:
        return True
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def resume_config(req: TrainRequest, saved: ExperimentConfig, source: Path) -> ExperimentConfig:
    """The config of a resumed run: ``saved`` (its ``config.yaml`` at ``source``) with ``--epochs`` applied.

    Raises:
        ConfigError: naming every option that conflicts with the saved run (option, key, saved and given value):
            a different dataset folder, ``--model``, ``--pretrained`` or ``--config`` value, except
            :data:`RESUME_MAY_CHANGE`.
    """
    mine = saved.flat()
    conflicts = []
    if not _same_folder(saved.data.root, req.data):
        conflicts.append(f"DATA (data.root): saved {str(saved.data.root)!r}, given {str(req.data)!r}")
    file_epochs = None
    for key, (option, value) in _given_settings(req).items():
        if key in RESUME_MAY_CHANGE:
            file_epochs = value
        elif mine[key] != value:
            conflicts.append(f"{option} ({key}): saved {mine[key]!r}, given {value!r}")
    if conflicts:
        raise ConfigError(
            f"--resume: {len(conflicts)} option(s) conflict with the saved run {source}: " + "; ".join(conflicts),
            expected="the saved run's settings; only --epochs may change when resuming",
            hint="drop the conflicting options (the run keeps its own), or start a new run with another --out"
            + ("; if the dataset moved, edit data.root in that config.yaml" if "DATA" in conflicts[0] else ""),
        )
    if req.epochs is None and file_epochs not in (None, saved.train.epochs):
        logger.info(
            "resuming with the saved train.epochs=%d (the --config file says %d; pass --epochs to change it)",
            saved.train.epochs,
            file_epochs,
        )
    return saved.updated({"train": {"epochs": req.epochs}})


def train(req: TrainRequest) -> TrainResult:
    """Run (or resume) one training; returns the trainer's summary."""
    from medseg.data.slide_layout import is_slide_dataset, tile_slide_dataset

    if is_slide_dataset(req.data):  # slides + annotations: tiles cut once at the model's input size, cached in DATA
        saved = RunDir(Path(req.out)).config if req.resume and req.out else None
        model_cfg = (load_config(saved) if saved and saved.is_file() else resolve_config(req)).model
        card = get_card(model_cfg.name)
        side = int((model_cfg.roi_size or card.roi_size)[0])
        tiles = tile_slide_dataset(req.data, task=card.task, tile_size=side)
        req = replace(req, data=tiles)
    cfg = resolve_config(req)
    dataset = load_classification_dataset(req.data) if detect_classification_layout(req.data) else None
    manifest = load_manifest(req.data) if dataset is None else None
    root_name = dataset.root.stem if dataset is not None else manifest.root.name  # type: ignore[union-attr]
    run_dir = RunDir(
        Path(req.out)
        if req.out
        else Path("runs") / (cfg.name if cfg.name != "run" else f"{cfg.model.name}_{root_name}")
    )
    if req.resume:
        if not run_dir.last.is_file():
            raise ConfigError(f"nothing to resume in {run_dir.root} (no checkpoints/last.pt)", hint="drop --resume")
        cfg = resume_config(req, load_config(run_dir.config), run_dir.config)
    elif run_dir.last.exists():
        raise ConfigError(
            f"{run_dir.root} already holds a training run",
            hint="add --resume to continue it, or choose another --out",
        )
    if dataset is not None:
        return _train_classifier(req, cfg, dataset, run_dir)
    if get_card(cfg.model.name).task == "classification":
        raise DataError(
            f"model {cfg.model.name!r} classifies images but {req.data} is a segmentation dataset",
            expected=EXPECTED_CLASSIFICATION,
            hint="see docs/classification.md for the class-folder, CSV and MedMNIST .npz layouts",
        )
    if cfg.train.label_smoothing:
        raise ConfigError(
            f"train.label_smoothing={cfg.train.label_smoothing} applies to classification models only",
            hint="remove it from the config",
        )
    with distributed.process_group(pick_device(cfg.train.device)):
        return _train_in_group(req, cfg, manifest, run_dir)  # type: ignore[arg-type]


def _train_classifier(
    req: TrainRequest, cfg: ExperimentConfig, dataset: ClassificationDataset, run_dir: RunDir
) -> TrainResult:
    """A classification run (one process): verify the images, apply the MedViTV2 recipe without ``--config``, train."""
    require_valid_classification(dataset)
    set_determinism(seed=cfg.train.seed)
    setup = prepare_classification(
        cfg, dataset, recipe=req.config is None and not req.resume, keep_epochs=req.epochs is not None
    )
    run_dir.root.mkdir(parents=True, exist_ok=True)
    with log_to_file(run_dir.log):
        if not req.resume:
            load_pretrained(setup.model, setup.config)
            run_dir.write_json(run_dir.card, setup.model.card.to_dict())
        with atomic_open(run_dir.config) as fh:
            fh.write(setup.config.to_yaml())
        logger.info("training classifier %s: %s, run dir %s", cfg.model.name, dataset.describe(), run_dir.root)
        with StepProgress("training", enabled=req.show_progress) as progress:
            trainer = ClassificationTrainer(
                setup.config, setup.model, setup.train, setup.val, run_dir.root, setup.test, progress.update
            )
            if req.resume:
                trainer.resume()
            return trainer.fit()


def _train_in_group(req: TrainRequest, cfg: ExperimentConfig, manifest: Manifest, run_dir: RunDir) -> TrainResult:
    """The part of :func:`train` that runs on every rank once the process group (if any) is up."""
    main = distributed.is_main()
    require_valid(manifest)
    label_names = resolve_label_names(manifest)
    card = get_card(cfg.model.name)
    plan: Plan | None = None
    sources: dict[str, str] = {}
    if not card.needs_prompts:
        if not req.resume and req.plan:
            given = _explicit_settings(req)
            if _left_to_plan(given):
                plan = distributed.broadcast(_plan_around(req, cfg, manifest, given) if main else None)
                cfg, sources = merge_plan(plan, cfg, given)
        source = "data.preset" if cfg.data.preset else f"the default of model {cfg.model.name!r}"
        preset = cfg.data.preset or card.intensity_preset
        check_preset_modality(preset, manifest.modality, force=cfg.data.force_preset, source=source)
    set_determinism(seed=cfg.train.seed)
    if card.needs_prompts:
        model, cfg = _prompted_model(cfg, manifest)
    else:
        model, cfg = _dense_model(cfg, manifest, label_names)
    trainer_cls = PromptTrainer if card.needs_prompts else Trainer
    trainer_cls.check_config(cfg, default_preset=card.intensity_preset)  # before anything is written
    train_cases, val_cases = split_cases(manifest.cases, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed)
    if main:  # only rank 0 writes the run directory
        run_dir.root.mkdir(parents=True, exist_ok=True)
    with log_to_file(run_dir.log) if main else contextlib.nullcontext():
        if not req.resume:
            load_pretrained(model, cfg)
        if main:
            if not req.resume:
                run_dir.write_json(run_dir.card, model.card.to_dict())
            with atomic_open(run_dir.config) as fh:  # on resume: the saved config with the new train.epochs
                fh.write(_sources_header(sources) + cfg.to_yaml())
            if plan is not None:
                write_plan(plan, run_dir.root / PLAN_FILE, sources)
                logger.info(
                    "planned from the dataset (%s):\n%s\nsettings: %s",
                    run_dir.root / PLAN_FILE,
                    plan.table(),
                    "; ".join(f"{k} from {v}" for k, v in sources.items()),
                )
        distributed.barrier()
        logger.info(
            "training %s%s on %s: %d training / %d validation cases, labels %s, roi %s, run dir %s",
            cfg.model.name,
            " (box prompts)" if card.needs_prompts else "",
            manifest.root,
            len(train_cases),
            len(val_cases),
            label_names,
            model.card.roi_size,
            run_dir.root,
        )
        cases = [c.as_dict() for c in train_cases], [c.as_dict() for c in val_cases]
        with StepProgress("training", enabled=req.show_progress and main) as progress:
            if card.needs_prompts:
                trainer = PromptTrainer(cfg, model, *cases, run_dir.root, label_names, progress=progress.update)
            else:
                trainer = Trainer(cfg, model, *cases, run_dir.root, progress=progress.update)
            if req.resume:
                trainer.resume()
            result = trainer.fit()
    return result


def _explicit_settings(req: TrainRequest) -> dict[str, str]:
    """``{"section.key": source}`` of the planned settings the config file states explicitly."""
    if req.config is None:
        return {}
    return {key: f"--config {req.config}" for key in config_file_keys(req.config) if key in PLANNED_KEYS}


def _left_to_plan(given: dict[str, str]) -> list[str]:
    """The planned keys the config file leaves out (``data.intensity`` goes with a given ``data.preset``)."""
    return [k for k in PLANNED_KEYS if k not in given and not (k == "data.intensity" and "data.preset" in given)]


def _plan_around(req: TrainRequest, cfg: ExperimentConfig, manifest: Manifest, given: dict[str, str]) -> Plan:
    """The plan, with the spacing / patch / batch the config file fixes kept and the rest fitted around them."""
    fixed = {
        "spacing": cfg.data.spacing if "data.spacing" in given else None,
        "patch_size": cfg.model.roi_size if "model.roi_size" in given else None,
        "batch_size": cfg.train.batch_size if "train.batch_size" in given else None,
    }
    if "data.spacing" in given and cfg.data.spacing is None:  # "each image's own spacing": plan at the median
        fixed["spacing"] = None
    return plan_dataset(
        manifest,
        cfg.model.name,
        device=cfg.train.device,
        memory_gib=req.memory_gib,
        model_kwargs=cfg.model.kwargs,
        configuration=req.configuration,
        **fixed,
    )


def _sources_header(sources: dict[str, str]) -> str:
    """YAML comment lines naming where each planned setting came from (empty without a plan)."""
    if not sources:
        return ""
    lines = ["# Settings planned from the dataset (plan.json) or stated in the config file:"]
    lines += [f"#   {key}: {source}" for key, source in sources.items()]
    return "\n".join(lines) + "\n"


def _dense_model(
    cfg: ExperimentConfig, manifest: Manifest, label_names: tuple[str, ...]
) -> tuple[nn.Module, ExperimentConfig]:
    """A network predicting every label of the dataset at once, with the config's ROI checked against its card."""
    card = get_card(cfg.model.name)
    roi = tuple(cfg.model.roi_size or card.roi_size)
    bad_axes = [i for i, (r, d) in enumerate(zip(roi, card.divisible_by, strict=False)) if r % d]
    if bad_axes:
        raise ConfigError(
            f"model.roi_size {roi} is not divisible by {card.divisible_by} on axes {bad_axes}",
            hint=f"choose a roi_size whose axes are multiples of {card.divisible_by}",
        )
    cfg = cfg.updated({"model": {"roi_size": list(roi)}, "data": {"preset": cfg.data.preset or card.intensity_preset}})
    model = create_model(
        cfg.model.name,
        in_channels=len(manifest.channel_names),
        label_names=label_names,
        roi_size=roi,
        **cfg.model.kwargs,
    )
    return model, cfg


def _prompted_model(cfg: ExperimentConfig, manifest: Manifest) -> tuple[nn.Module, ExperimentConfig]:
    """A promptable 2D model: one logit per box prompt, trained on (slice, label) prompts of every labelled case."""
    if manifest.num_channels not in (1, 3):
        raise ConfigError(
            f"model {cfg.model.name!r} takes grey (1 channel) or RGB (3 channel) images; dataset {manifest.root} has "
            f"{manifest.num_channels} channels {list(manifest.channel_names)}",
            hint="train a prompted model on one channel (e.g. a dataset with only the T1 images)",
        )
    model = create_model(cfg.model.name, **cfg.model.kwargs)
    size = tuple(model.card.roi_size)
    if cfg.model.roi_size is not None and tuple(cfg.model.roi_size) != size:
        raise ConfigError(
            f"model.roi_size {list(cfg.model.roi_size)} is set for model {cfg.model.name!r}, whose input size is "
            f"{list(size)} (box-prompted 2D training resizes every slice to the model's input)",
            expected=f"no model.roi_size, or {list(size)}",
            hint="set the input size with model.kwargs.img_size instead",
        )
    return model, cfg.updated({"model": {"roi_size": list(size)}})


def load_pretrained(model: nn.Module, cfg: ExperimentConfig) -> None:
    """Map the ``model.pretrained`` files (local weights), in order, onto the network with the model's own loader."""
    paths = cfg.model.pretrained
    if not paths:
        return
    loader = getattr(model, "load_pretrained", None)
    if loader is None:
        raise ConfigError(
            f"model {cfg.model.name!r} has no loader for pretrained weights ({', '.join(map(str, paths))})",
            hint="drop --pretrained; the SAM models (db_sam, sam_unet_r50, sam_unet_r34) load sam_vit_b_01ec64.pth, "
            "stunet_* the official STU-Net checkpoints",
        )
    digests = cfg.model.pretrained_sha256 or (None,) * len(paths)
    for path, digest in zip(paths, digests, strict=True):
        loader(Path(path), sha256=digest)
        logger.info("loaded pretrained weights from %s", path)
