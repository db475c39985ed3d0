"""Confusion-matrix metrics per label: Dice, accuracy, precision, specificity, IoU, MCC.

This is the metric set of the MPU-Net paper (arXiv:2307.05799); medseg reports it for every model. MONAI's
``compute_confusion_matrix_metric`` returns NaN for every 0 / 0, so a complete miss (nothing predicted) gets precision
and MCC NaN and drops out of case averages; the few lines are therefore written here with explicit conventions.

Each foreground label ``k`` is scored one-vs-rest: positive voxels are ``pred == k`` / ``ref == k``, everything else
(background and the other labels) is negative. The counts TP, FP, TN, FN are integers; the metrics are computed from
them in float64:

* ``dice`` = 2 TP / (2 TP + FP + FN); NaN when the label is absent from both prediction and reference.
* ``iou`` = TP / (TP + FP + FN); NaN when absent from both.
* ``precision`` = TP / (TP + FP); NaN when absent from both, **0** when nothing is predicted but the reference has
  the label (a complete miss must not vanish from the averages).
* ``specificity`` = TN / (TN + FP); NaN when the reference has no negative voxel (the label fills the volume).
* ``accuracy`` = (TP + TN) / N; always defined (maps must hold at least one voxel).
* ``mcc`` = (TP TN - FP FN) / sqrt((TP + FP) (TP + FN) (TN + FP) (TN + FN)); NaN when absent from both; when the
  denominator is 0 otherwise: **1** if prediction equals reference (the label fills the whole volume in both), else
  **0** (one mask is constant, so no correlation can be measured; scikit-learn's rule).

NaN means "undefined for this case": averages over cases skip it, as medseg's Dice summary does for labels absent
from both masks. A label absent from both still scores accuracy and specificity 1.

Per-case metrics averaged over cases (what the evaluation reports) differ from pooled metrics computed from counts
summed over all cases; :func:`confusion_counts` and :func:`metrics_from_counts` give both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medseg.core.errors import ConfigError, DataError

__all__ = ["METRIC_NAMES", "binary_confusion_metrics", "confusion_counts", "metrics_from_counts"]

METRIC_NAMES = ("dice", "accuracy", "precision", "specificity", "iou", "mcc")


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr)):
            return arr.astype(np.int64)
        raise DataError(
            f"{name} has dtype {arr.dtype} with non-integer values",
            expected="a label map of integers (argmax of the logits, not probabilities)",
        )
    return arr


def confusion_counts(pred: Any, ref: Any, num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """One-vs-rest counts ``(TP, FP, TN, FN)`` of every foreground label.

    Args:
        pred: predicted label map, any shape (e.g. ``(D, H, W)`` or ``(1, 1, D, H, W)``), tensor or array.
        ref: reference label map of the same shape.
        num_classes: number of classes, background (label 0) included.

    Returns:
        ``{label_index: (tp, fp, tn, fn)}`` for ``label_index`` in ``1 .. num_classes - 1`` (Python ints).

    Raises:
        ConfigError: ``num_classes < 2``.
        DataError: shapes differ, the maps are empty, not integer, or hold labels outside ``[0, num_classes)``.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}", expected=">= 2 (background and at least one label)")
    p, r = _as_array(pred, "prediction"), _as_array(ref, "reference")
    if p.shape != r.shape:
        raise DataError(
            f"prediction shape {p.shape} differs from reference shape {r.shape}",
            expected="label maps on the same voxel grid",
            hint="resample the prediction to the reference grid first",
        )
    if p.size == 0:
        raise DataError(f"label maps of shape {p.shape} are empty", expected="at least one voxel")
    for arr, name in ((p, "prediction"), (r, "reference")):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{name} holds labels {lo}..{hi}",
                expected=f"labels in 0..{num_classes - 1} (num_classes={num_classes})",
                hint="check the label names / out_channels of the model against the dataset",
            )
    n = int(p.size)
    counts: dict[int, tuple[int, int, int, int]] = {}
    for k in range(1, num_classes):
        pk, rk = p == k, r == k
        tp = int(np.count_nonzero(pk & rk))
        fp = int(np.count_nonzero(pk)) - tp
        fn = int(np.count_nonzero(rk)) - tp
        counts[k] = (tp, fp, n - tp - fp - fn, fn)
    return counts


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Dice, accuracy, precision, specificity, IoU and MCC from one-vs-rest counts (float64, module conventions).

    Args:
        tp: true positives. fp: false positives. tn: true negatives. fn: false negatives (all >= 0, sum >= 1).

    Returns:
        ``{"dice", "accuracy", "precision", "specificity", "iou", "mcc"}`` as Python floats, NaN where undefined.
    """
    if min(tp, fp, tn, fn) < 0 or tp + fp + tn + fn == 0:
        raise DataError(f"confusion counts tp={tp} fp={fp} tn={tn} fn={fn}", expected="non-negative, sum >= 1")
    tp_, fp_, tn_, fn_ = (np.float64(v) for v in (tp, fp, tn, fn))
    nan = float("nan")
    absent = tp + fp + fn == 0
    if absent:
        dice = iou = precision = mcc = nan
    else:
        dice = float(2 * tp_ / (2 * tp_ + fp_ + fn_))
        iou = float(tp_ / (tp_ + fp_ + fn_))
        precision = float(tp_ / (tp_ + fp_)) if tp + fp else 0.0
        denominator = (tp_ + fp_) * (tp_ + fn_) * (tn_ + fp_) * (tn_ + fn_)
        if denominator > 0:
            mcc = float((tp_ * tn_ - fp_ * fn_) / math.sqrt(denominator))
        else:
            mcc = 1.0 if fp == fn == 0 else 0.0
    specificity = float(tn_ / (tn_ + fp_)) if tn + fp else nan
    accuracy = float((tp_ + tn_) / (tp_ + fp_ + tn_ + fn_))
    return {
        "dice": dice,
        "accuracy": accuracy,
        "precision": precision,
        "specificity": specificity,
        "iou": iou,
        "mcc": mcc,
    }


def binary_confusion_metrics(pred: Any, ref: Any, num_classes: int) -> dict[int, dict[str, float]]:
    """The MPU-Net metric set of every foreground label of one case, one-vs-rest.

    Args:
        pred: predicted label map (tensor or array, any shape, e.g. ``(D, H, W)``).
        ref: reference label map of the same shape.
        num_classes: number of classes, background (label 0) included.

    Returns:
        ``{label_index: {"dice", "accuracy", "precision", "specificity", "iou", "mcc"}}`` for label indices
        ``1 .. num_classes - 1``; floats, NaN where undefined (see the module docstring for the conventions).

    Raises:
        ConfigError: ``num_classes < 2``.
        DataError: mismatched shapes, empty or non-integer maps, labels outside ``[0, num_classes)``.

    Examples::

        >>> pred = torch.tensor([[0, 1, 1], [0, 0, 2]])
        >>> ref = torch.tensor([[0, 1, 0], [0, 0, 2]])
        >>> binary_confusion_metrics(pred, ref, 3)[1]["dice"]
        0.6666666666666666
    """
    return {k: metrics_from_counts(*c) for k, c in confusion_counts(pred, ref, num_classes).items()}
