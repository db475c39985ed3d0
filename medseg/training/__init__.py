"""Trainer, losses, run directories."""

from medseg.inference.rundir import RunDir
from medseg.training.losses import LOSSES, build_loss
from medseg.training.trainer import Trainer, TrainResult

__all__ = ["LOSSES", "RunDir", "TrainResult", "Trainer", "build_loss"]
