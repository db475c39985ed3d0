"""Training of 2D image classifiers (MedViTV2): cross-entropy on whole images, the MedViTV2 recipe, class metrics.

:class:`ClassificationTrainer` is a :class:`~medseg.training.trainer.Trainer`: same run directory, atomic
checkpoints, exact resume from ``last.pt``, per-epoch seeding of data order, augmentation and DropPath from
``(train.seed, epoch)``, AdamW with the LR schedule stepped per iteration (``train.epochs * train.iters_per_epoch``
steps), progress callback and DDP. What differs:

* data: :class:`~medseg.data.classification.ClassSample` dicts ``{"image", "label", "case_id"}``; the training
  transform is the recipe's augmentation (random resized crop to ``model.roi_size``, horizontal flip, small
  rotation; :func:`~medseg.data.classification.classification_train_transforms`), validation resizes only;
* loss: ``torch.nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)`` (``train.loss`` does not apply);
* validation: accuracy, balanced accuracy, macro F1 and one-vs-rest macro AUROC (:func:`classification_metrics`);
  ``best.pt`` follows the validation accuracy, and each new best writes ``metrics.json`` and ``confusion.png``;
* curves: ``curves.png`` shows the training loss and the validation metrics.

The MedViTV2 recipe (arXiv:2502.13693; docs/models/medvit2.md): AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05,
cosine annealing per iteration down to 5e-6 (``min_lr_ratio`` 0.05), no warm-up, batch 24, 100 epochs of one pass
over the training set each. :func:`apply_recipe` sets it when ``medseg train`` runs without ``--config``; AugMix
(alpha 0.4) is replaced by a rotation of up to 10 degrees (MONAI has no AugMix).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from torch import nn

from medseg.core.atomic import atomic_write
from medseg.core.config import ExperimentConfig, validate_config
from medseg.core.errors import ConfigError, DataError
from medseg.core.keys import IMAGE, LABEL
from medseg.data.classification import (
    ClassificationDataset,
    classification_eval_transforms,
    classification_train_transforms,
    split_samples,
)
from medseg.inference.rundir import load_checkpoint
from medseg.training import distributed
from medseg.training.trainer import ProgressFn, Trainer, TrainResult
from medseg.transforms.presets import PHOTO_PRESETS

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS_FILE",
    "RECIPE",
    "ClassificationTrainResult",
    "ClassificationSetup",
    "ClassificationTrainer",
    "apply_recipe",
    "classification_metrics",
    "plot_confusion",
    "prepare_classification",
]

METRICS_FILE, CONFUSION_FILE, TEST_CONFUSION_FILE = "metrics.json", "confusion.png", "confusion_test.png"
#: The MedViTV2 training recipe (``train`` settings); ``iters_per_epoch`` is one pass over the training set.
RECIPE: dict[str, Any] = {
    "lr": 1e-4,
    "weight_decay": 0.05,
    "warmup_iters": 0,
    "min_lr_ratio": 5e-6 / 1e-4,
    "schedule": "cosine",
    "grad_clip": None,
    "batch_size": 24,
    "epochs": 100,
}
VAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


@dataclass(frozen=True)
class ClassificationTrainResult(TrainResult):
    """:class:`TrainResult` of a classifier: ``best_mean_dice`` is ``None``; the best validation accuracy instead."""

    best_accuracy: float | None = None


def apply_recipe(cfg: ExperimentConfig, n_train: int, *, keep_epochs: bool = False) -> ExperimentConfig:
    """``cfg`` with the MedViTV2 recipe's ``train`` settings (:data:`RECIPE`), the batch capped at ``n_train`` and
    ``iters_per_epoch`` set to one pass over the ``n_train`` training images; ``keep_epochs``: leave
    ``train.epochs`` (given on the command line) as it is."""
    data = cfg.model_dump(mode="json")
    recipe = {k: v for k, v in RECIPE.items() if not (keep_epochs and k == "epochs")}
    batch = max(1, min(int(recipe["batch_size"]), n_train))
    data["train"].update(recipe, batch_size=batch, iters_per_epoch=max(1, math.ceil(n_train / batch)))
    return validate_config(data, source="the MedViTV2 training recipe")


@dataclass(frozen=True)
class ClassificationSetup:
    """Everything a classification run needs, from :func:`prepare_classification`.

    Attributes:
        config: the resolved config (recipe applied where asked, ``model.roi_size`` and ``data.preset`` filled in).
        model: the classifier, one output per class, its card naming the classes.
        train, val, test: ``ClassSample.as_dict()`` of each split.
    """

    config: ExperimentConfig
    model: nn.Module
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]


def prepare_classification(
    cfg: ExperimentConfig, dataset: ClassificationDataset, *, recipe: bool, keep_epochs: bool = False
) -> ClassificationSetup:
    """Split, configure and build the model of a classification run.

    Validation images are the dataset's ``val`` split, else a stratified ``data.val_fraction`` of ``train`` (seeded
    with ``train.seed``, so a resumed run splits as the original did).

    Args:
        cfg: the run's config.
        dataset: from :func:`~medseg.data.classification.load_classification_dataset`.
        recipe: apply the MedViTV2 recipe (:func:`apply_recipe`; ``medseg train`` without ``--config``).
        keep_epochs: with ``recipe``, keep ``train.epochs`` (given with ``--epochs``).

    Raises:
        ConfigError: settings the classification trainer does not use, a volume preset, a bad input size.
    """
    from medseg.models import create_model, get_card

    card = get_card(cfg.model.name)
    if card.task != "classification":
        raise ConfigError(
            f"model {cfg.model.name!r} is a {card.task} model and {dataset.root} a classification dataset",
            hint="train a classifier (e.g. --model medvit2_tiny) on it",
        )
    train = dataset.train
    val = dataset.val or split_samples(dataset.train, cfg.data.val_fraction, cfg.train.seed)[1]
    if not dataset.val:
        train = split_samples(dataset.train, cfg.data.val_fraction, cfg.train.seed)[0]
    if recipe:
        cfg = apply_recipe(cfg, len(train), keep_epochs=keep_epochs)
    size = ClassificationTrainer.input_size(cfg, card)
    cfg = cfg.updated({"model": {"roi_size": list(size)}, "data": {"preset": cfg.data.preset or card.intensity_preset}})
    ClassificationTrainer.check_config(cfg, default_preset=card.intensity_preset)
    model = create_model(
        cfg.model.name,
        out_channels=dataset.num_classes,
        label_names=dataset.class_names,
        roi_size=size,
        **cfg.model.kwargs,
    )
    return ClassificationSetup(
        cfg, model, [s.as_dict() for s in train], [s.as_dict() for s in val], [s.as_dict() for s in dataset.test]
    )


def classification_metrics(
    labels: Sequence[int] | np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, one-vs-rest macro AUROC and the confusion matrix.

    Args:
        labels: reference class indices ``(N,)``.
        probabilities: class probabilities ``(N, K)`` (rows sum to 1); the prediction is their argmax.
        class_names: the ``K`` class names.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix", "class_names"}``.
        ``balanced_accuracy`` is the mean recall over the classes present in ``labels`` (scikit-learn's rule);
        ``macro_f1`` averages all ``K`` classes (an absent, never-predicted class scores 0); ``auroc`` is the mean
        over classes of the AUROC of "class k vs the rest" on ``probabilities[:, k]``, over the classes that have
        both positive and negative references (for two classes, the usual binary AUROC), ``None`` when no class
        has; ``confusion_matrix[i][j]`` counts references ``i`` predicted as ``j``.

    Raises:
        DataError: empty inputs, mismatched lengths, or labels outside ``0 .. K-1``.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    probs = np.asarray(probabilities, dtype=np.float64)
    k = len(class_names)
    if y.size == 0 or probs.shape != (y.size, k):
        raise DataError(
            f"metrics of {y.size} labels and probabilities of shape {probs.shape}",
            expected=f"N >= 1 labels and probabilities (N, {k})",
        )
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"labels {int(y.min())}..{int(y.max())}", expected=f"class indices 0..{k - 1}")
    pred = probs.argmax(axis=1)
    aurocs = [float(roc_auc_score(y == c, probs[:, c])) for c in range(k) if 0 < int(np.count_nonzero(y == c)) < y.size]
    return {
        "n": int(y.size),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)),
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
        "class_names": list(class_names),
    }


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix (rows: reference, columns: prediction) as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    side = max(3.5, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(m, cmap="Blues")
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="reference", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            colour = "white" if m[i, j] > m.max() / 2 else "black"
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", color=colour)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def plot_classification_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation metrics per epoch, as ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    val = [r for r in records if "val_accuracy" in r]
    for name in VAL_METRICS:
        points = [(r["epoch"], r[f"val_{name}"]) for r in val if r.get(f"val_{name}") is not None]
        if points:
            ax_val.plot(*zip(*points, strict=True), marker="o", label=name.replace("_", " "))
    if val:
        ax_val.legend()
    ax_val.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


class ClassificationTrainer(Trainer):
    """:class:`~medseg.training.trainer.Trainer` for 2D classifiers (``card.task == "classification"``).

    Args:
        config: the resolved experiment config (``model.roi_size``: the input ``(H, W)``).
        model: a classifier ``(B, 3, H, W) -> (B, num_classes)`` carrying ``.card`` (label names = class names).
        train_samples: ``ClassSample.as_dict()`` of the training images.
        val_samples: the same for validation (may be empty: ``best.pt`` then follows the training loss).
        run_dir: where the run lives.
        test_samples: scored with ``best.pt`` once training ends (``metrics.json["test"]``, ``confusion_test.png``).
        progress: optional per-step callback.

    Raises:
        ConfigError: a setting of dense training is set (:attr:`unused_settings`), a volume preset, or an input size
            the model refuses.
    """

    best_key = "val_accuracy"

    family: ClassVar[str] = "2D image classification (cross-entropy on whole images)"
    unused_settings: ClassVar[tuple[str, ...]] = (
        "data.spacing",  # photographs are not resampled, only resized to model.roi_size
        "data.crop_foreground",
        "train.fg_ratio",  # no patches
        "train.loss",  # cross-entropy; train.label_smoothing configures it
        "train.max_val_slices",
        "infer.overlap",  # no sliding window: one forward pass per image
        "infer.sw_batch_size",
        "infer.blend",
        "infer.tta",
        "infer.tta_axes",
        "infer.crop_foreground",
        "infer.foreground_floor",
        "infer.backend",
        "infer.precision",
        "infer.accumulate",
    )

    def __init__(
        self,
        config: ExperimentConfig,
        model: nn.Module,
        train_samples: list[dict[str, Any]],
        val_samples: list[dict[str, Any]],
        run_dir: Path,
        test_samples: Sequence[dict[str, Any]] = (),
        progress: ProgressFn | None = None,
    ) -> None:
        super().__init__(config, model, train_samples, val_samples, run_dir, progress)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
        self.class_names = tuple(self.card.label_names)
        self.test_samples = list(test_samples)

    @classmethod
    def check_config(cls, config: ExperimentConfig, default_preset: str | None = None) -> None:
        super().check_config(config, default_preset)
        preset = config.data.preset or default_preset
        if preset not in PHOTO_PRESETS:
            raise ConfigError(
                f"data.preset {preset!r} is a volume preset; classification of 2D images takes {PHOTO_PRESETS}",
                hint="remove data.preset (the model card's preset applies)",
            )

    @staticmethod
    def input_size(config: ExperimentConfig, card: Any) -> tuple[int, int]:
        """The network input ``(H, W)``: ``model.roi_size`` or the card's, checked against the card's rules.

        Raises:
            ConfigError: not two axes, not multiples of ``card.divisible_by`` or below ``card.min_size``.
        """
        size = tuple(int(s) for s in (config.model.roi_size or card.roi_size))
        low = tuple(card.min_size or (1, 1))
        bad = len(size) != 2 or any(s % d for s, d in zip(size, card.divisible_by, strict=False))
        if bad or any(s < m for s, m in zip(size, low, strict=False)):
            raise ConfigError(
                f"model.roi_size {list(size)} does not suit model {card.name!r}",
                expected=f"(H, W), multiples of {list(card.divisible_by)}, at least {list(low)}",
                hint=f"e.g. model.roi_size: {list(card.roi_size)}",
            )
        return size  # type: ignore[return-value]

    def build_datasets(self, train_cases: list[dict[str, Any]], val_cases: list[dict[str, Any]]) -> tuple[Any, Any]:
        size = self.input_size(self.cfg, self.card)
        preset = self.cfg.data.preset or self.card.intensity_preset
        self.eval_transform = classification_eval_transforms(size, preset)
        train_ds = CacheDataset(train_cases, transform=classification_train_transforms(size, preset), progress=False)
        val_ds = CacheDataset(val_cases, transform=self.eval_transform, progress=False)
        logger.info("classification: %d training / %d validation images at %s", len(train_ds), len(val_ds), size)
        return train_ds, val_ds

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch[IMAGE].float().to(self.device, non_blocking=True)
        label = torch.as_tensor(batch[LABEL]).long().to(self.device, non_blocking=True)
        return self.loss_fn(self.model(image), label)

    @torch.no_grad()
    def predict_dataset(self, dataset: Any, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,), probabilities (N, K))`` of a dataset of eval-transformed items, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        labels, probs = [], []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        for batch in loader:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                logits = self.model(batch[IMAGE].float().to(self.device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(torch.as_tensor(batch[LABEL]).numpy())
        self.model.train(was_training)
        return np.concatenate(labels), np.concatenate(probs)

    def validate(self) -> dict[str, Any]:
        """Accuracy, balanced accuracy, macro F1 and AUROC on the validation images (kept for ``metrics.json``)."""
        labels, probs = self.predict_dataset(self.val_ds)
        self.last_val = classification_metrics(labels, probs, self.class_names)
        return {f"val_{k}": _round(self.last_val[k]) for k in VAL_METRICS}

    def fit(self) -> ClassificationTrainResult:
        """Train until ``train.epochs``; then score the test images (if any) with ``best.pt``."""
        start = time.perf_counter()
        self._run_epochs()
        if distributed.is_main() and self.test_samples:
            self._score_test()
        distributed.barrier()
        best = self.best_metric if self.best_metric is not None and len(self.val_ds) else None
        return ClassificationTrainResult(
            self.run.root, self.epoch, self.step, None, self.best_epoch, time.perf_counter() - start, best
        )

    def _on_best(self, record: dict[str, Any]) -> None:
        self._write_best(record)

    def _plot(self, records: list[dict[str, Any]]) -> None:
        plot_classification_curves(records, self.run.curves)

    @staticmethod
    def _describe(record: dict[str, Any]) -> str:
        return _describe(record)

    def _metrics_path(self) -> Path:
        return self.run.root / METRICS_FILE

    def _read_metrics_json(self) -> dict[str, Any]:
        import json

        path = self._metrics_path()
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_best(self, record: dict[str, Any]) -> None:
        report: dict[str, Any] = {"best_epoch": self.epoch, "selected_by": "val_accuracy"}
        if "val_accuracy" in record and getattr(self, "last_val", None) is not None:
            report["val"] = self.last_val
            plot_confusion(
                self.last_val["confusion_matrix"],
                self.class_names,
                self.run.root / CONFUSION_FILE,
                f"validation, epoch {self.epoch} (accuracy {self.last_val['accuracy']:.3f})",
            )
        else:
            report["selected_by"] = "train_loss"
        self.run.write_json(self._metrics_path(), report)

    def _score_test(self) -> None:
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(load_checkpoint(self.run.best)["model"])
        test_ds = CacheDataset(self.test_samples, transform=self.eval_transform, progress=False)
        labels, probs = self.predict_dataset(test_ds)
        self.model.load_state_dict(state)  # the trainer keeps its last weights (resume continues from them)
        metrics = classification_metrics(labels, probs, self.class_names)
        report = self._read_metrics_json() | {"test": metrics}
        self.run.write_json(self._metrics_path(), report)
        plot_confusion(
            metrics["confusion_matrix"],
            self.class_names,
            self.run.root / TEST_CONFUSION_FILE,
            f"test, best.pt (accuracy {metrics['accuracy']:.3f})",
        )
        logger.info("test images (%d): %s", metrics["n"], {k: _round(metrics[k]) for k in VAL_METRICS})


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _describe(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.4f}"
    if "val_accuracy" in record:
        text += ", val " + ", ".join(f"{k} {record[f'val_{k}']}" for k in VAL_METRICS)
    return text + f" ({record['seconds']:.0f} s)"
