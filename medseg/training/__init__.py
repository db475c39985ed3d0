"""Trainer, losses, run directories."""

from medseg.training.losses import LOSSES, build_loss
from medseg.training.rundir import RunDir
from medseg.training.trainer import Trainer, TrainResult

__all__ = ["LOSSES", "RunDir", "TrainResult", "Trainer", "build_loss"]
