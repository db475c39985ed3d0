"""Whole-image inference: sliding window, flip TTA, ``Predictor`` mapping masks back to the input grid, and the
slice-wise ``PromptPredictor`` for promptable 2D models."""

from medseg.inference.predictor import LabelStat, Prediction, Predictor, label_statistics
from medseg.inference.prompted import PromptPredictor
from medseg.inference.prompts import Prompts
from medseg.inference.sliding import WindowSettings, sliding_window_probs

__all__ = [
    "LabelStat",
    "Prediction",
    "PromptPredictor",
    "Predictor",
    "Prompts",
    "WindowSettings",
    "label_statistics",
    "sliding_window_probs",
]
