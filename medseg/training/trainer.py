"""The trainer: Dice + CE, AdamW with warm-up and cosine (or poly) decay, patch sampling with foreground
oversampling, sliding-window validation with per-label Dice, atomic checkpoints and exact resume.

One epoch is ``iters_per_epoch`` optimiser steps. Every random stream of an epoch is a function of
``(train.seed, epoch)`` alone (:func:`epoch_seeds`): the data order (the sampler's generator), the augmentation
(the ``generator`` handed to MONAI's ``DataLoader``, which seeds the dataset's random transforms from it, in the
training process with ``num_workers=0`` and per worker, ``base_seed + worker_id``, otherwise) and the dropout /
DropPath masks (torch's global RNG, seeded at the start of the epoch). So augmentation differs between epochs, two
runs with the same seed draw the same, and a run resumed from ``last.pt`` (written at the end of each epoch) draws,
from its next epoch on, exactly what an uninterrupted run drew; no RNG state needs to travel in the checkpoint.
Draws do depend on ``num_workers`` (each worker has its own stream). Bitwise-equal weights on CUDA also need
deterministic kernels (``torch.use_deterministic_algorithms``), which this module does not switch on.

Under ``torchrun`` (:mod:`medseg.training.distributed`) the same code trains data-parallel: ``train.batch_size`` is
the global batch, each rank takes its slice of every global batch of the epoch's sampler and seeds its augmentation
and dropout streams from ``(seed, epoch, rank)``, DDP all-reduces the gradients, validation cases are shared out and
their scores gathered, and only rank 0 writes the run directory. In a single process nothing of this applies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.data.utils import worker_init_fn
from monai.transforms import Compose, RandAffined
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError
from medseg.core.keys import IMAGE, LABEL
from medseg.inference.planar import FrameWise, frame_window
from medseg.inference.rundir import RunDir, load_checkpoint, save_checkpoint
from medseg.inference.sliding import WindowSettings, plain, sliding_window_probs
from medseg.training import distributed
from medseg.training.curves import plot_curves
from medseg.training.losses import build_loss
from medseg.training.metrics import dice_per_label
from medseg.transforms.presets import preprocessing_for, training_transforms_for

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    epochs: int
    steps: int
    best_mean_dice: float | None
    best_epoch: int | None
    seconds: float


def warmup_cosine(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_poly(total_steps: int, warmup: int, min_ratio: float, exponent: float = 0.9) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then polynomial decay ``(1 - progress) ** exponent``
    (nnU-Net's PolyLR) from 1 to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * (1 - progress) ** exponent

    return factor


SCHEDULES = ("cosine", "poly")


def lr_schedule(config: ExperimentConfig, model: nn.Module) -> tuple[str, Callable[[int], float]]:
    """The run's LR multiplier: ``train.schedule``, else the model's ``paper_schedule``, else ``cosine``.

    Raises:
        ConfigError: an unknown schedule name, or ``train.poly_exponent`` set while the schedule is not ``poly``.
    """
    t = config.train
    name = t.schedule or getattr(model, "paper_schedule", None) or "cosine"
    if name not in SCHEDULES:
        raise ConfigError(
            f"model {config.model.name!r} declares the LR schedule {name!r}",
            expected=f"one of {SCHEDULES}",
            hint="set train.schedule explicitly",
        )
    total = t.epochs * t.iters_per_epoch
    default_exponent = type(t).model_fields["poly_exponent"].default
    if name != "poly" and t.poly_exponent != default_exponent:
        raise ConfigError(
            f"train.poly_exponent={t.poly_exponent} is set but the LR schedule of model {config.model.name!r} is "
            f"{name!r}, which does not use it",
            expected=f"train.schedule: poly, or poly_exponent at its default {default_exponent}",
            hint="add `schedule: poly` to the train section, or remove poly_exponent",
        )
    if name == "poly":
        return name, warmup_poly(total, t.warmup_iters, t.min_lr_ratio, t.poly_exponent)
    return name, warmup_cosine(total, t.warmup_iters, t.min_lr_ratio)


class EpochSeeds(NamedTuple):
    """Seeds of one epoch's independent random streams (see the module docstring)."""

    order: int
    augment: int
    model: int


def epoch_seeds(seed: int, epoch: int) -> EpochSeeds:
    """The seeds of epoch ``epoch`` (0-based) of a run seeded ``seed``: NumPy's ``SeedSequence((seed, epoch))``, so
    the streams of neighbouring epochs and seeds are unrelated."""
    return EpochSeeds(*(int(s) for s in np.random.SeedSequence((int(seed), int(epoch))).generate_state(3)))


class Trainer:
    """Train one model on one dataset into one run directory.

    Args:
        config: the resolved experiment config (see :mod:`medseg.core.config`).
        model: a network from :func:`medseg.models.create_model` (carries ``.card``).
        train_cases: dicts ``{"image": [paths], "label": path, "case_id": str}``.
        val_cases: same, for validation (may be empty: then ``best.pt`` follows the training loss).
        run_dir: where the run lives.
        progress: optional callback receiving ``{"step", "total", "loss", "epoch", "lr"}`` after every step.

    Raises:
        ConfigError: a setting this trainer does not use is not at its default (:meth:`check_config`).
    """

    #: What this trainer trains, for error messages.
    family: ClassVar[str] = "dense 3D training (patches, sliding-window validation)"
    #: Settings this trainer does not read; :meth:`check_config` refuses them unless they hold their defaults.
    unused_settings: ClassVar[tuple[str, ...]] = ("train.max_val_slices",)

    def __init__(
        self,
        config: ExperimentConfig,
        model: nn.Module,
        train_cases: list[dict[str, Any]],
        val_cases: list[dict[str, Any]],
        run_dir: Path,
        progress: ProgressFn | None = None,
    ) -> None:
        self.cfg = config
        self.card = model.card  # type: ignore[attr-defined]
        self.check_config(config, default_preset=self.card.intensity_preset)
        self.run = RunDir(Path(run_dir))
        self.device = pick_device(config.train.device)
        self.model = model.to(self.device)
        # A 2D model trains on (B, C, X, Y, 1) patches of (C, X, Y, Z|T) images (medseg.inference.planar).
        self.network: nn.Module = FrameWise(self.model) if self.card.spatial_dims == 2 else self.model
        self.progress = progress
        t = config.train
        self.train_ds, self.val_ds = self.build_datasets(train_cases, val_cases)
        self.loss_fn = build_loss(t.loss or getattr(model, "paper_loss", "dice_ce"))
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # frozen encoders stay out
        self.optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.total_steps = t.epochs * t.iters_per_epoch
        self.batch_per_rank = distributed.per_rank_batch(t.batch_size)  # train.batch_size is the global batch
        self._ddp: nn.Module | None = None
        self.schedule, factor = lr_schedule(config, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.use_amp = t.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    @classmethod
    def check_config(cls, config: ExperimentConfig, default_preset: str | None = None) -> None:
        """Refuse settings this trainer would ignore: ``unused_settings`` away from their defaults, and
        ``data.ct_window`` when the intensity preset (``data.preset``, else ``default_preset``) is not ``ct``.

        Raises:
            ConfigError: naming every such key with its value and default, and the model family.
        """
        problems = [f"{k}={v!r} (default {d!r})" for k, (v, d) in config.non_defaults(cls.unused_settings).items()]
        preset = config.data.preset or default_preset
        if "data.ct_window" not in cls.unused_settings and preset not in (None, "ct"):
            problems += [
                f"{k}={v!r} (default {d!r}; read by the ct preset only, this run's preset is {preset!r})"
                for k, (v, d) in config.non_defaults(["data.ct_window"]).items()
            ]
        if problems:
            raise ConfigError(
                f"model {config.model.name!r} ({cls.family}) does not use {', '.join(problems)}",
                expected="settings a model family does not use left at their defaults",
                hint="remove them from the config",
            )

    # ----------------------------------------------------------------------------------------------- hooks
    def build_datasets(self, train_cases: list[dict[str, Any]], val_cases: list[dict[str, Any]]) -> tuple[Any, Any]:
        """Training dataset (random patches, foreground-oversampled) and validation dataset (whole images)."""
        t, d = self.cfg.train, self.cfg.data
        self.window = dataclasses.replace(WindowSettings.from_config(self.cfg, self.card), tta=False)
        if self.card.spatial_dims == 2:
            self.window = frame_window(self.window)
        transform = training_transforms_for(d, self.card.intensity_preset, self.window.roi_size, t.fg_ratio)
        train_ds = CacheDataset(
            train_cases,
            transform=in_plane(transform) if self.card.spatial_dims == 2 else transform,
            progress=False,
        )
        val_ds = CacheDataset(
            val_cases,
            transform=preprocessing_for(d, self.card.intensity_preset, with_label=True),
            progress=False,
        )
        return train_ds, val_ds

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Loss of one training batch."""
        image = plain(batch[IMAGE]).to(self.device, non_blocking=True)
        label = plain(batch[LABEL]).to(self.device, non_blocking=True)
        return self.loss_fn(self.network(image), label)

    def collate(self, items: list[Any]) -> Any:
        """Collate function of the training loader."""
        return list_data_collate(items)

    # ----------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Everything needed to resume (plain types and tensors only: loads with ``weights_only=True``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "card": self.card.to_dict(),
            "model_name": self.cfg.model.name,
            "model_kwargs": dict(self.cfg.model.kwargs),
        }

    def resume(self) -> None:
        """Load ``last.pt`` and continue after its epoch; later metric records are dropped."""
        ckpt = load_checkpoint(self.run.last)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_metric, self.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        kept = [r for r in self.run.read_metrics() if r["epoch"] <= self.epoch]
        distributed.barrier()  # every rank has read metrics.jsonl before rank 0 rewrites it
        if distributed.is_main():
            self.run.write_metrics(kept)
        logger.info("resumed %s at epoch %d, step %d", self.run.root, self.epoch, self.step)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train until ``train.epochs``; returns the best validation mean Dice and where it was reached."""
        start = time.perf_counter()
        self._run_epochs()
        return TrainResult(
            self.run.root, self.epoch, self.step, self.best_metric, self.best_epoch, time.perf_counter() - start
        )

    def _run_epochs(self) -> None:
        """The epoch loop every trainer shares: train, validate, broadcast, keep ``best.pt`` / ``last.pt``."""
        t = self.cfg.train
        records = self.run.read_metrics()
        if distributed.is_distributed() and self._ddp is None:  # after resume(): rank 0's weights go to every rank
            self._ddp = distributed.wrap_ddp(self.model, self.batch_loss, self.device)
        while self.epoch < t.epochs:
            epoch_start = time.perf_counter()
            loss = distributed.mean_over_ranks(self._train_epoch())
            self.epoch += 1
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            if len(self.val_ds) and (self.epoch % t.val_every == 0 or self.epoch == t.epochs):
                record.update(self.validate())
            record["seconds"] = round(time.perf_counter() - epoch_start, 2)
            record = distributed.broadcast(record)  # every rank decides on best.pt as rank 0 does
            improved = self._update_best(record)
            records.append(record)
            if distributed.is_main():
                self.run.write_metrics(records)
                save_checkpoint(self.state(), self.run.last)
                if improved:
                    save_checkpoint(self.state(), self.run.best)
                    self._on_best(record)
                self._plot(records)
                logger.info("epoch %d/%d %s", self.epoch, t.epochs, self._describe(record))
            distributed.barrier()  # the epoch's checkpoint is on disk before any rank goes on
        if distributed.is_main() and not self.run.best.exists():  # e.g. resumed a finished run without best.pt
            save_checkpoint(self.state(), self.run.best)
        distributed.barrier()

    def _on_best(self, record: dict[str, Any]) -> None:
        """Called on rank 0 after ``best.pt`` was written for ``record`` (nothing more for segmentation)."""

    def _plot(self, records: list[dict[str, Any]]) -> None:
        """Redraw the run's training curves."""
        plot_curves(records, self.run.curves)

    @staticmethod
    def _describe(record: dict[str, Any]) -> str:
        """The epoch's log line after ``epoch N/M``."""
        return _describe(record)

    #: The validation record key that decides ``best.pt`` (higher is better).
    best_key = "val_mean_dice"

    def _update_best(self, record: dict[str, Any]) -> bool:
        if self.best_key in record:
            metric = record[self.best_key]
        elif not len(self.val_ds):
            metric = -record["train_loss"]
        else:
            return False
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_epoch = metric, self.epoch
            return True
        return False

    def _loader(self) -> DataLoader:
        """This epoch's loader; seeds every random stream of the epoch from ``(train.seed, epoch)``."""
        t = self.cfg.train
        seeds = epoch_seeds(t.seed, self.epoch)
        # dropout / DropPath masks (torch's global RNG, CUDA included); per rank under DDP (rank 0: these seeds)
        torch.manual_seed(distributed.rank_seed(seeds.model, t.seed, self.epoch, 2))
        sampler: torch.utils.data.Sampler[int] = torch.utils.data.RandomSampler(
            self.train_ds,
            replacement=True,
            num_samples=t.iters_per_epoch * t.batch_size,  # the global batches: the same on every rank
            generator=torch.Generator().manual_seed(seeds.order),
        )
        if distributed.is_distributed():
            sampler = distributed.RankSlices(sampler, self.batch_per_rank)
        # MONAI's DataLoader seeds the dataset's random transforms (anything with ``set_random_state``) from this
        # generator: in this process for num_workers=0, else per worker from the worker's seed (worker_init_fn).
        # Without a generator it would draw from, and then rewind, torch's global RNG: the same draws every epoch.
        return DataLoader(
            self.train_ds,
            batch_size=self.batch_per_rank,
            sampler=sampler,
            num_workers=t.num_workers,
            collate_fn=self.collate,
            drop_last=True,
            generator=torch.Generator().manual_seed(distributed.rank_seed(seeds.augment, t.seed, self.epoch, 1)),
            worker_init_fn=worker_init_fn,
        )

    def _train_epoch(self) -> float:
        t = self.cfg.train
        self.model.train()
        losses = []
        for batch in self._loader():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                loss = self._ddp(batch) if self._ddp is not None else self.batch_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; lower train.lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            losses.append(loss.item())
            if self.progress:
                self.progress(
                    {
                        "step": self.step,
                        "total": self.total_steps,
                        "loss": float(np.mean(losses[-20:])),
                        "epoch": self.epoch + 1,
                        "lr": self.optimizer.param_groups[0]["lr"],
                    }
                )
        return float(np.mean(losses))

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Sliding-window prediction of every validation case; mean Dice per foreground label.

        Under DDP each rank predicts every ``W``-th case and the per-case scores are gathered, so every rank
        reports the Dice of all cases, as one process does.
        """
        self.model.eval()
        names = self.card.label_names
        scores: dict[int, np.ndarray] = {}
        for i in distributed.shard(len(self.val_ds)):
            item = self.val_ds[i]
            image = plain(item[IMAGE])[None].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                probs = sliding_window_probs(self.network, image, self.window)
            pred = probs.argmax(1, keepdim=True).cpu()
            label = plain(item[LABEL])[None].long()
            scores[i] = dice_per_label(pred, label, len(names))
        scores = distributed.gather_items(scores)
        per_label = np.nanmean(np.stack([scores[i] for i in sorted(scores)]), axis=0)
        per_label = np.nan_to_num(per_label, nan=0.0)
        self.model.train()
        return {
            "val_dice": {name: round(float(v), 4) for name, v in zip(names[1:], per_label, strict=True)},
            "val_mean_dice": round(float(per_label.mean()), 4),
        }


def in_plane(transform: Compose) -> Compose:
    """``transform`` with its random affine kept in the image plane, for 2D models training on ``(C, X, Y, 1)``
    patches: rotation about the third axis only and no scaling along it (a tilt out of the plane would sample
    outside the one-frame patch and leave it empty)."""
    for step in transform.transforms:
        if isinstance(step, RandAffined):
            grid = step.rand_affine.rand_affine_grid
            grid.rotate_range = (0.0, 0.0, *grid.rotate_range[2:3])
            grid.scale_range = (*grid.scale_range[:2], 0.0)
    return transform


def _describe(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.4f}"
    if "val_mean_dice" in record:
        text += f", val mean Dice {record['val_mean_dice']:.4f} {record['val_dice']}"
    return text + f" ({record['seconds']:.0f} s)"
