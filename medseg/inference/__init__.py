"""Whole-image inference: sliding window, flip TTA, ``Predictor`` mapping masks back to the input grid."""

from medseg.inference.predictor import LabelStat, Prediction, Predictor, label_statistics
from medseg.inference.sliding import WindowSettings, sliding_window_probs

__all__ = ["LabelStat", "Prediction", "Predictor", "WindowSettings", "label_statistics", "sliding_window_probs"]
