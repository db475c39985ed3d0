"""Segmentation metrics per label: Dice and 95th-percentile Hausdorff distance (MONAI), and the confusion-matrix
metrics MPU-Net reports (accuracy, precision, specificity, IoU, MCC; :mod:`medseg.training.confusion`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from medseg.training.confusion import binary_confusion_metrics


def dice_per_label(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each foreground label for one case; NaN where the label is absent from both.

    Args:
        pred: predicted labels ``(1, 1, *S)``.
        label: reference labels ``(1, 1, *S)``.
        num_classes: number of classes, background included.

    Returns:
        ``(num_classes - 1,)`` array.
    """
    dice = compute_dice(
        one_hot(pred.long(), num_classes),
        one_hot(label.long(), num_classes),
        include_background=False,
        ignore_empty=True,
    )
    return dice[0].cpu().numpy()


def case_metrics(
    pred: torch.Tensor, label: torch.Tensor, label_names: Sequence[str], spacing: Sequence[float]
) -> dict[str, dict[str, float | None]]:
    """Dice, HD95 (mm), accuracy, precision, specificity, IoU and MCC of every foreground label of one case.

    Args:
        pred: predicted labels ``(X, Y, Z)``.
        label: reference labels ``(X, Y, Z)`` on the same grid.
        label_names: names of label values, background first.
        spacing: voxel spacing in mm, for HD95.

    Returns:
        ``{label_name: {"dice", "hd95", "accuracy", "precision", "specificity", "iou", "mcc"}}`` (one-vs-rest,
        see :mod:`medseg.training.confusion` for the empty-case rules); ``None`` where undefined.
    """
    n = len(label_names)
    p = one_hot(torch.as_tensor(pred)[None, None].long(), n)
    r = one_hot(torch.as_tensor(label)[None, None].long(), n)
    dice = compute_dice(p, r, include_background=False, ignore_empty=True)[0]
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            p, r, include_background=False, percentile=95, spacing=[float(s) for s in spacing]
        )[0]
    confusion = binary_confusion_metrics(np.asarray(pred), np.asarray(label), n)
    out: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(label_names[1:]):
        extra = {k: _finite(torch.tensor(v)) for k, v in confusion[i + 1].items() if k != "dice"}
        out[name] = {"dice": _finite(dice[i]), "hd95": _finite(hd[i]), **extra}
    return out


def summarize(per_case: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, Any]:
    """Mean of each metric per label over cases (ignoring undefined values) and the mean over labels."""
    labels: dict[str, dict[str, float | None]] = {}
    names = next(iter(per_case.values())).keys() if per_case else []
    for name in names:
        labels[name] = {}
        for metric in next(iter(per_case.values()))[name]:
            values = [c[name][metric] for c in per_case.values() if c[name].get(metric) is not None]
            labels[name][metric] = round(float(np.mean(values)), 4) if values else None
    dices = [v["dice"] for v in labels.values() if v["dice"] is not None]
    return {"per_label": labels, "mean_dice": round(float(np.mean(dices)), 4) if dices else None}


def _finite(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if math.isnan(v) or math.isinf(v) else round(v, 4)
