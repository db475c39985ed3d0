"""Whole-image inference behind one contract (:class:`SegmentationPredictor`): the dense ``Predictor`` (sliding
window, flip TTA, masks mapped back to the input grid), the slice-wise ``PromptPredictor`` for promptable 2D models,
and the openers that turn a model folder into one (:func:`medseg.open_predictor`)."""

from medseg.inference.contract import SegmentationPredictor
from medseg.inference.prediction import LabelStat, Prediction, label_statistics
from medseg.inference.predictor import Predictor
from medseg.inference.prompted import PromptPredictor
from medseg.inference.prompts import Prompts
from medseg.inference.sliding import WindowSettings, sliding_window_probs

__all__ = [
    "LabelStat",
    "Prediction",
    "PromptPredictor",
    "Predictor",
    "Prompts",
    "SegmentationPredictor",
    "WindowSettings",
    "label_statistics",
    "sliding_window_probs",
]
