"""The trainer: Dice + CE, AdamW with warm-up and cosine decay, patch sampling with foreground oversampling,
sliding-window validation with per-label Dice, atomic checkpoints and exact resume.

One epoch is ``iters_per_epoch`` optimiser steps. Data order and augmentation are re-seeded at the start of every
epoch from ``(seed, epoch)``, so a run resumed from ``last.pt`` (written at the end of each epoch) continues with
the same step counter and the same data it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.keys import IMAGE, LABEL
from medseg.inference.sliding import WindowSettings, plain, sliding_window_probs
from medseg.training.losses import build_loss
from medseg.training.metrics import dice_per_label
from medseg.training.rundir import RunDir, load_checkpoint, plot_curves, save_checkpoint
from medseg.transforms.presets import preprocessing_for, training_transforms

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


class Trainer:
    """Train one model on one dataset into one run directory.

    Args:
        config: the resolved experiment config (see :mod:`medseg.core.config`).
        model: a network from :func:`medseg.models.create_model` (carries ``.card``).
        train_cases: dicts ``{"image": [paths], "label": path, "case_id": str}``.
        val_cases: same, for validation (may be empty: then ``best.pt`` follows the training loss).
        run_dir: where the run lives.
        progress: optional callback receiving ``{"step", "total", "loss", "epoch", "lr"}`` after every step.
    """

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
        self.run = RunDir(Path(run_dir))
        self.device = pick_device(config.train.device)
        self.model = model.to(self.device)
        self.progress = progress
        t = config.train
        self.train_ds, self.val_ds = self.build_datasets(train_cases, val_cases)
        self.loss_fn = build_loss(t.loss or getattr(model, "paper_loss", "dice_ce"))
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # frozen encoders stay out
        self.optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.total_steps = t.epochs * t.iters_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, t.warmup_iters, t.min_lr_ratio)
        )
        self.use_amp = t.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    # ----------------------------------------------------------------------------------------------- hooks
    def build_datasets(self, train_cases: list[dict[str, Any]], val_cases: list[dict[str, Any]]) -> tuple[Any, Any]:
        """Training dataset (random patches, foreground-oversampled) and validation dataset (whole images)."""
        t, d = self.cfg.train, self.cfg.data
        self.window = dataclasses.replace(WindowSettings.from_config(self.cfg, self.card), tta=False)
        preset = d.preset or self.card.intensity_preset
        train_ds = CacheDataset(
            train_cases,
            transform=training_transforms(
                preset,
                d.spacing,
                self.window.roi_size,
                t.fg_ratio,
                ct_window=d.ct_window,
                crop_foreground=d.crop_foreground,
            ),
            progress=False,
        )
        val_ds = CacheDataset(
            val_cases,
            transform=preprocessing_for(d, self.card.intensity_preset, with_label=True),
            progress=False,
        )
        return train_ds, val_ds

    def reseed(self, seed: int) -> None:
        """Seed the training data's random transforms for one epoch."""
        self.train_ds.transform.set_random_state(seed=seed % (2**32))

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Loss of one training batch."""
        image = plain(batch[IMAGE]).to(self.device, non_blocking=True)
        label = plain(batch[LABEL]).to(self.device, non_blocking=True)
        return self.loss_fn(self.model(image), label)

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
        self.run.write_metrics([r for r in self.run.read_metrics() if r["epoch"] <= self.epoch])
        logger.info("resumed %s at epoch %d, step %d", self.run.root, self.epoch, self.step)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train until ``train.epochs``; returns the best validation mean Dice and where it was reached."""
        t = self.cfg.train
        start = time.perf_counter()
        records = self.run.read_metrics()
        while self.epoch < t.epochs:
            epoch_start = time.perf_counter()
            loss = self._train_epoch()
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
            improved = self._update_best(record)
            records.append(record)
            self.run.write_metrics(records)
            save_checkpoint(self.state(), self.run.last)
            if improved:
                save_checkpoint(self.state(), self.run.best)
            plot_curves(records, self.run.curves)
            logger.info("epoch %d/%d %s", self.epoch, t.epochs, _describe(record))
        if not self.run.best.exists():  # e.g. resumed a finished run whose best.pt was deleted
            save_checkpoint(self.state(), self.run.best)
        return TrainResult(
            self.run.root, self.epoch, self.step, self.best_metric, self.best_epoch, time.perf_counter() - start
        )

    def _update_best(self, record: dict[str, Any]) -> bool:
        if "val_mean_dice" in record:
            metric = record["val_mean_dice"]
        elif not len(self.val_ds):
            metric = -record["train_loss"]
        else:
            return False
        if self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_epoch = metric, self.epoch
            return True
        return False

    def _loader(self) -> DataLoader:
        t = self.cfg.train
        seed = t.seed * 100_003 + self.epoch
        self.reseed(seed)
        sampler = torch.utils.data.RandomSampler(
            self.train_ds,
            replacement=True,
            num_samples=t.iters_per_epoch * t.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
        return DataLoader(
            self.train_ds,
            batch_size=t.batch_size,
            sampler=sampler,
            num_workers=t.num_workers,
            collate_fn=self.collate,
            drop_last=True,
        )

    def _train_epoch(self) -> float:
        t = self.cfg.train
        self.model.train()
        losses = []
        for batch in self._loader():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                loss = self.batch_loss(batch)
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
        """Sliding-window prediction of every validation case; mean Dice per foreground label."""
        self.model.eval()
        names = self.card.label_names
        scores = []
        for item in self.val_ds:
            image = plain(item[IMAGE])[None].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                probs = sliding_window_probs(self.model, image, self.window)
            pred = probs.argmax(1, keepdim=True).cpu()
            label = plain(item[LABEL])[None].long()
            scores.append(dice_per_label(pred, label, len(names)))
        per_label = np.nanmean(np.stack(scores), axis=0)
        per_label = np.nan_to_num(per_label, nan=0.0)
        self.model.train()
        return {
            "val_dice": {name: round(float(v), 4) for name, v in zip(names[1:], per_label, strict=True)},
            "val_mean_dice": round(float(per_label.mean()), 4),
        }


def _describe(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.4f}"
    if "val_mean_dice" in record:
        text += f", val mean Dice {record['val_mean_dice']:.4f} {record['val_dice']}"
    return text + f" ({record['seconds']:.0f} s)"
