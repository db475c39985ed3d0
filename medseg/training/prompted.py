"""Training of promptable 2D models (DB-SAM, SAM-UNet) on 2D images or on the slices of 3D volumes.

The data are (slice, label) prompts: every slice of every training case that contains a label value becomes one item
per label value present, with that label's binary mask as the target and a box prompt derived from it the way each
paper does (bounding box of the largest connected component, then the model's jitter rule: DB-SAM enlarges each side
by up to 20 px on a 256 grid, SAM-UNet shifts the box by up to 5 px). 3D volumes are cut along their third voxel axis.
Images go through SAM's intensity handling once per case (percentile clip to 0-255, grey replicated to RGB), then
each slice is resized on its longest side to the model's input size, normalised with SAM's mean/std and padded.

Validation prompts the model with the unjittered box of every validation (slice, label) item (at most
``train.max_val_slices``, evenly spread) and reports the mean Dice per label on the slices' own grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.errors import DataError
from medseg.core.keys import IMAGE, LABEL
from medseg.training.trainer import ProgressFn, Trainer
from medseg.transforms.io import LoadImage
from medseg.transforms.sam import BOX_JITTER, box_from_mask, prepare_mask, prepare_slice, sam_intensity, volume_slice

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
        seed: seed of the jitter (re-seed per epoch with :meth:`reseed`).

    Items are dicts ``{"image": (3, S, S) float, "label": (1, S, S) float, "box": (4,) float, "index": int}``.
    """

    def __init__(self, cases: list[dict[str, Any]], size: int, jitter: str | None, seed: int = 0) -> None:
        self.size = size
        self.jitter = BOX_JITTER[jitter] if jitter else None
        self.rng = np.random.default_rng(seed)
        self.images: list[torch.Tensor] = []
        self.labels: list[np.ndarray] = []
        self.items: list[_Item] = []
        loader = LoadImage()
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

    def reseed(self, seed: int) -> None:
        """Restart the jitter's random stream (one stream per epoch)."""
        self.rng = np.random.default_rng(seed)

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
        box = box_from_mask(mask)
        if box is None:  # cannot happen for listed items; keeps the contract explicit
            raise DataError(f"item {i} has an empty mask")
        if self.jitter is not None:
            box = self.jitter(box, rows, cols, self.rng)
        x, frame = prepare_slice(image, self.size)
        target = prepare_mask(torch.from_numpy(mask.astype(np.float32)), self.size)
        return {
            IMAGE: x,
            LABEL: target[None].float(),
            BOX: frame.box_to_model(box).float(),
            "index": i,
        }


class PromptTrainer(Trainer):
    """:class:`~medseg.training.trainer.Trainer` for promptable 2D models (``card.needs_prompts``).

    Same run directory, checkpoints, resume, progress and scheduler; the data are box-prompted slices (see the
    module docstring) and the loss is the model's paper loss unless ``train.loss`` names another.

    Args:
        config: the resolved experiment config.
        model: a promptable network (``forward(x, *, boxes=...)``) carrying ``.card``, ``.img_size``, ``.box_jitter``.
        train_cases: labelled training cases.
        val_cases: labelled validation cases.
        run_dir: where the run lives.
        label_names: the dataset's label names, background first (used to name the validation Dice).
        progress: optional per-step callback.
    """

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
        train_ds = PromptSliceDataset(train_cases, size, jitter, seed=self.cfg.train.seed)
        val_ds = PromptSliceDataset(val_cases, size, None) if val_cases else []
        logger.info(
            "prompted training: %d (slice, label) items from %d cases; %d for validation",
            len(train_ds),
            len(train_cases),
            len(val_ds),
        )
        return train_ds, val_ds

    def reseed(self, seed: int) -> None:
        self.train_ds.reseed(seed)

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch[IMAGE].to(self.device, non_blocking=True)
        label = batch[LABEL].to(self.device, non_blocking=True)
        boxes = batch[BOX].to(self.device, non_blocking=True)
        return self.loss_fn(self.model(image, boxes=boxes), label)

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
            box = frame.box_to_model(box_from_mask(mask)).float()[None].to(self.device)
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
