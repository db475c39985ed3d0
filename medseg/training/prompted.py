"""Training of promptable 2D models (DB-SAM, SAM-UNet) on 2D images or on the slices of 3D volumes.

The data are (slice, label) prompts: every slice of every training case that contains a label value becomes one item
per label value present, with that label's binary mask as the target and a box prompt derived from it the way each
paper does: the model's ``box_rule`` (DB-SAM boxes all foreground pixels, SAM-UNet the largest connected component,
see :func:`medseg.transforms.sam.box_from_mask`), then the model's jitter rule (DB-SAM enlarges each side by up to
20 px on a 256 grid, SAM-UNet shifts the box by up to 5 px). 3D volumes are cut along their third voxel axis. A model
with ``loss_on_lowres`` (DB-SAM) is trained on its ``forward_low_res`` logits ``(B, 1, S/4, S/4)`` against the label
resized (nearest neighbour, from the slice) to that ``S/4`` frame, as its paper does.
Images go through SAM's intensity handling once per case (percentile clip to 0-255, grey replicated to RGB), then
each slice is resized on its longest side to the model's input size, normalised with SAM's mean/std and padded.

The jitter draws come from the dataset's own generator, which MONAI's ``DataLoader`` seeds every epoch through
:meth:`PromptSliceDataset.set_random_state` (per worker when ``num_workers > 0``), and the slice sampling from the
trainer's per-epoch sampler: both are functions of ``(train.seed, epoch)``, so they differ between epochs, repeat
between runs with the same seed and continue exactly across a resume (see :mod:`medseg.training.trainer`).

Validation prompts the model with the unjittered box of every validation (slice, label) item (at most
``train.max_val_slices``, evenly spread) and reports the mean Dice per label on the slices' own grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.errors import DataError
from medseg.core.keys import IMAGE, LABEL
from medseg.training.trainer import ProgressFn, Trainer
from medseg.transforms.io import LoadImage
from medseg.transforms.sam import (
    BOX_JITTER,
    DEFAULT_BOX_RULE,
    box_from_mask,
    box_rule_of,
    prepare_mask,
    prepare_slice,
    sam_intensity,
    volume_slice,
)

logger = logging.getLogger(__name__)

BOX = "box"


@dataclass(frozen=True)
class _Item:
    case: int
    z: int
    value: int


class PromptSliceDataset(torch.utils.data.Dataset):
    """(slice, label value) items of labelled cases, with box prompts derived from the masks.

    Args:
        cases: dicts ``{"image": [paths], "label": path, "case_id": str}``.
        size: the model's square input side ``S``.
        jitter: ``"enlarge"``, ``"shift"`` or ``None`` (no jitter: validation).
        seed: seed of the jitter (re-seeded per epoch by the trainer's loader, see :meth:`set_random_state`).
        box_rule: how boxes are drawn from the masks (see :func:`~medseg.transforms.sam.box_from_mask`).
        label_size: side of the target's square frame (default ``size``; ``size // 4`` for a low-resolution loss).

    Items are dicts ``{"image": (3, S, S) float, "label": (1, L, L) float, "box": (4,) float, "index": int}`` with
    ``L = label_size``.
    """

    def __init__(
        self,
        cases: list[dict[str, Any]],
        size: int,
        jitter: str | None,
        seed: int = 0,
        box_rule: str = DEFAULT_BOX_RULE,
        label_size: int | None = None,
    ) -> None:
        self.size = size
        self.jitter = BOX_JITTER[jitter] if jitter else None
        self.box_rule = box_rule
        self.label_size = int(label_size or size)
        self.rng = np.random.default_rng(seed)
        self.images: list[torch.Tensor] = []
        self.labels: list[np.ndarray] = []
        self.items: list[_Item] = []
        loader = LoadImage(allow_external_data=True)  # dataset files on local disk
        for index, case in enumerate(cases):
            image = loader(case[IMAGE])
            label = np.asarray(loader(case[LABEL]))[0]
            if tuple(label.shape) != tuple(image.shape[1:]):
                raise DataError(
                    f"case {case.get('case_id', index)}: label shape {label.shape} differs from image "
                    f"{tuple(image.shape[1:])}",
                    hint="run `medseg verify-data` on the dataset",
                )
            # uint8 after SAM's 0-255 scaling: a quarter of the memory of float32, no information lost.
            self.images.append(sam_intensity(image).round().clamp(0, 255).to(torch.uint8))
            label = label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32)  # compact: many cases in RAM
            self.labels.append(label)
            for z in range(label.shape[2]):
                values = np.unique(label[:, :, z])
                self.items.extend(_Item(index, z, int(v)) for v in values if v > 0)

    def set_random_state(self, seed: int | None = None, state: np.random.Generator | None = None) -> PromptSliceDataset:
        """Restart the jitter's random stream: from ``seed``, or use the generator ``state``.

        MONAI's ``DataLoader`` (and its ``worker_init_fn``) call this, as for MONAI's own random transforms.
        """
        self.rng = state if state is not None else np.random.default_rng(seed)
        return self

    def __len__(self) -> int:
        return len(self.items)

    def slice_pair(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        """Image ``(3, rows, cols)`` in [0, 255] and binary mask ``(rows, cols)`` of item ``i`` (SAM frame)."""
        item = self.items[i]
        image = volume_slice(self.images[item.case], item.z).float()
        mask = volume_slice(torch.from_numpy(self.labels[item.case][None] == item.value), item.z)[0].numpy()
        return image, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.slice_pair(i)
        rows, cols = mask.shape
        box = box_from_mask(mask, self.box_rule)
        if box is None:  # cannot happen for listed items; keeps the contract explicit
            raise DataError(f"item {i} has an empty mask")
        if self.jitter is not None:
            box = self.jitter(box, rows, cols, self.rng)
        x, frame = prepare_slice(image, self.size)
        target = prepare_mask(torch.from_numpy(mask.astype(np.float32)), self.label_size)
        return {
            IMAGE: x,
            LABEL: target[None].float(),
            BOX: frame.box_to_model(box).float(),
            "index": i,
        }


class PromptTrainer(Trainer):
    """:class:`~medseg.training.trainer.Trainer` for promptable 2D models (``card.needs_prompts``).

    Same run directory, checkpoints, resume, progress, scheduler and per-epoch seeding; the data are box-prompted
    slices (see the module docstring) and the loss is the model's paper loss unless ``train.loss`` names another.
    The settings of patch sampling, voxel resampling, intensity presets and sliding-window inference do not apply
    and are refused unless at their defaults (``unused_settings``); ``model.roi_size`` is the model's input size.

    Args:
        config: the resolved experiment config.
        model: a promptable network (``forward(x, *, boxes=...)``) carrying ``.card``, ``.img_size``, ``.box_jitter``.
        train_cases: labelled training cases.
        val_cases: labelled validation cases.
        run_dir: where the run lives.
        label_names: the dataset's label names, background first (used to name the validation Dice).
        progress: optional per-step callback.
    """

    family: ClassVar[str] = "box-prompted 2D training on image slices"
    unused_settings: ClassVar[tuple[str, ...]] = (
        "data.preset",  # SAM's own intensity handling (percentile clip to 0-255)
        "data.spacing",  # slices stay on their voxel grid, resized to the model's input
        "data.ct_window",
        "data.crop_foreground",
        "train.fg_ratio",  # every labelled (slice, label) pair is an item; no patches
        "infer.overlap",  # no sliding window: one forward pass per prompted slice
        "infer.sw_batch_size",
        "infer.blend",
        "infer.tta",  # prompts belong to one orientation
    )

    def __init__(
        self,
        config: ExperimentConfig,
        model: nn.Module,
        train_cases: list[dict[str, Any]],
        val_cases: list[dict[str, Any]],
        run_dir: Any,
        label_names: tuple[str, ...],
        progress: ProgressFn | None = None,
    ) -> None:
        self.dataset_label_names = tuple(label_names)
        super().__init__(config, model, train_cases, val_cases, run_dir, progress)
        if not len(self.train_ds):
            raise DataError(
                "the training cases hold no labelled slice",
                expected="label values > 0 in the training masks",
                hint="run `medseg verify-data` on the dataset",
            )

    def build_datasets(self, train_cases: list[dict[str, Any]], val_cases: list[dict[str, Any]]) -> tuple[Any, Any]:
        size = int(self.model.img_size)  # type: ignore[attr-defined]
        jitter = getattr(self.model, "box_jitter", None)
        rule = box_rule_of(self.model)
        label_size = size // 4 if self.low_res_loss else size
        train_ds = PromptSliceDataset(
            train_cases, size, jitter, seed=self.cfg.train.seed, box_rule=rule, label_size=label_size
        )
        val_ds = PromptSliceDataset(val_cases, size, None, box_rule=rule) if val_cases else []
        logger.info(
            "prompted training: %d (slice, label) items from %d cases; %d for validation",
            len(train_ds),
            len(train_cases),
            len(val_ds),
        )
        return train_ds, val_ds

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch[IMAGE].to(self.device, non_blocking=True)
        label = batch[LABEL].to(self.device, non_blocking=True)
        boxes = batch[BOX].to(self.device, non_blocking=True)
        if self.low_res_loss:
            return self.loss_fn(self.model.forward_low_res(image, boxes=boxes), label)  # type: ignore[operator]
        return self.loss_fn(self.model(image, boxes=boxes), label)

    @property
    def low_res_loss(self) -> bool:
        """Whether the model is trained on its ``forward_low_res`` logits (``model.loss_on_lowres``, DB-SAM)."""
        return bool(getattr(self.model, "loss_on_lowres", False)) and hasattr(self.model, "forward_low_res")

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Dice of the box-prompted prediction of validation slices, averaged per label value."""
        self.model.eval()
        ds: PromptSliceDataset = self.val_ds  # type: ignore[assignment]
        limit = self.cfg.train.max_val_slices
        chosen = np.unique(np.linspace(0, len(ds) - 1, num=min(limit, len(ds))).round().astype(int))
        scores: dict[int, list[float]] = {}
        for i in chosen:
            image, mask = ds.slice_pair(int(i))
            x, frame = prepare_slice(image, ds.size)
            box = frame.box_to_model(box_from_mask(mask, ds.box_rule)).float()[None].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                logits = self.model(x[None].to(self.device), boxes=box)
            pred = frame.logits_to_slice(logits[0, 0].float().cpu()) > 0
            ref = torch.from_numpy(mask)
            inter = (pred & ref).sum().item()
            denom = pred.sum().item() + ref.sum().item()
            scores.setdefault(ds.items[int(i)].value, []).append(2 * inter / denom if denom else 1.0)
        self.model.train()
        names = self.dataset_label_names
        per_label = {
            (names[v] if v < len(names) else f"label_{v}"): round(float(np.mean(s)), 4)
            for v, s in sorted(scores.items())
        }
        return {"val_dice": per_label, "val_mean_dice": round(float(np.mean(list(per_label.values()))), 4)}
