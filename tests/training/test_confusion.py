"""Confusion-matrix metrics (MPU-Net's metric set) against hand-computed values and the empty-mask conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.core.errors import ConfigError, DataError
from medseg.training.confusion import (
    METRIC_NAMES,
    binary_confusion_metrics,
    confusion_counts,
    metrics_from_counts,
)

# 10 voxels, labels 0 / 1 / 2
REF = [0, 0, 1, 1, 1, 2, 2, 0, 0, 0]
PRED = [0, 1, 1, 1, 0, 2, 0, 0, 2, 0]


def test_counts_by_hand() -> None:
    # label 1: predicted at 1, 2, 3; reference at 2, 3, 4 -> TP 2 (2, 3), FP 1 (1), FN 1 (4), TN 6
    # label 2: predicted at 5, 8; reference at 5, 6 -> TP 1, FP 1 (8), FN 1 (6), TN 7
    assert confusion_counts(np.array(PRED), np.array(REF), 3) == {1: (2, 1, 6, 1), 2: (1, 1, 7, 1)}


def test_metrics_by_hand() -> None:
    m = binary_confusion_metrics(np.array(PRED), np.array(REF), 3)
    assert set(m) == {1, 2} and all(tuple(v) == METRIC_NAMES for v in m.values())
    expected_1 = {"dice": 4 / 6, "accuracy": 8 / 10, "precision": 2 / 3, "specificity": 6 / 7, "iou": 2 / 4}
    expected_1["mcc"] = (2 * 6 - 1 * 1) / math.sqrt(3 * 3 * 7 * 7)  # 11 / 21
    expected_2 = {"dice": 2 / 4, "accuracy": 8 / 10, "precision": 1 / 2, "specificity": 7 / 8, "iou": 1 / 3}
    expected_2["mcc"] = (1 * 7 - 1 * 1) / math.sqrt(2 * 2 * 8 * 8)  # 0.375
    for label, expected in ((1, expected_1), (2, expected_2)):
        for name, value in expected.items():
            assert m[label][name] == pytest.approx(value, abs=1e-15), (label, name)
            assert isinstance(m[label][name], float)


def test_mcc_is_the_pearson_correlation_of_the_binary_masks_and_iou_follows_dice() -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, size=(6, 7, 8))
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.integers(0, 3, size=ref.shape))
    m = binary_confusion_metrics(torch.as_tensor(pred)[None, None], torch.as_tensor(ref)[None, None], 3)
    for k in (1, 2):
        pearson = np.corrcoef((pred == k).ravel(), (ref == k).ravel())[0, 1]
        assert m[k]["mcc"] == pytest.approx(pearson, abs=1e-12)
        d = m[k]["dice"]
        assert m[k]["iou"] == pytest.approx(d / (2 - d), abs=1e-12)


def test_label_absent_from_both() -> None:
    m = binary_confusion_metrics(np.zeros((2, 3)), np.zeros((2, 3)), 2)[1]
    assert all(math.isnan(m[k]) for k in ("dice", "iou", "precision", "mcc"))
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0


def test_complete_miss_scores_zero_not_nan() -> None:
    ref = np.array([0, 1, 1, 0])
    m = binary_confusion_metrics(np.zeros(4, dtype=np.uint8), ref, 2)[1]
    assert m == {"dice": 0.0, "accuracy": 0.5, "precision": 0.0, "specificity": 1.0, "iou": 0.0, "mcc": 0.0}


def test_false_alarm_on_an_empty_reference() -> None:
    m = binary_confusion_metrics(np.array([0, 1, 0, 0]), np.zeros(4, dtype=int), 2)[1]
    assert m == {"dice": 0.0, "accuracy": 0.75, "precision": 0.0, "specificity": 0.75, "iou": 0.0, "mcc": 0.0}


def test_label_filling_the_volume() -> None:
    full = np.ones((2, 2), dtype=np.int64)
    m = binary_confusion_metrics(full, full, 2)[1]
    assert m["dice"] == m["iou"] == m["precision"] == m["accuracy"] == m["mcc"] == 1.0
    assert math.isnan(m["specificity"])  # no negative voxel in the reference
    partial = binary_confusion_metrics(np.array([[1, 1], [1, 0]]), full, 2)[1]
    assert partial["mcc"] == 0.0 and math.isnan(partial["specificity"])
    assert partial["precision"] == 1.0 and partial["dice"] == pytest.approx(6 / 7)


def test_float64_with_large_counts() -> None:
    m = metrics_from_counts(tp=3_000_000_000, fp=7, tn=9_000_000_000, fn=5)
    assert 0.999999 < m["mcc"] < 1.0 and 0.999999 < m["dice"] < 1.0
    assert m["specificity"] == pytest.approx(1 - 7 / 9_000_000_007, abs=1e-15)


def test_accepts_integral_floats_and_tensors() -> None:
    a = binary_confusion_metrics(np.array(PRED, dtype=np.float32), torch.tensor(REF), 3)
    b = binary_confusion_metrics(torch.tensor(PRED, dtype=torch.uint8), np.array(REF), 3)
    assert a == b


def test_errors() -> None:
    with pytest.raises(DataError, match="differs from reference shape"):
        binary_confusion_metrics(np.zeros((2, 3)), np.zeros((3, 2)), 2)
    with pytest.raises(DataError, match="labels 0..3"):
        binary_confusion_metrics(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(DataError, match="labels -1..1"):
        binary_confusion_metrics(np.array([0, 1]), np.array([-1, 1]), 3)
    with pytest.raises(DataError, match="non-integer"):
        binary_confusion_metrics(np.array([0.2, 0.9]), np.array([0, 1]), 2)
    with pytest.raises(DataError, match="empty"):
        binary_confusion_metrics(np.zeros((0, 3)), np.zeros((0, 3)), 2)
    with pytest.raises(ConfigError, match="num_classes=1"):
        binary_confusion_metrics(np.zeros(3), np.zeros(3), 1)
    with pytest.raises(DataError, match="non-negative"):
        metrics_from_counts(1, -1, 0, 0)
