"""Losses of the dense (softmax, one channel per class) networks: ``dice_ce``."""

from __future__ import annotations

from monai.losses import DiceCELoss
from torch import nn

from medseg.training.losses.registry import register_loss

__all__ = ["dice_ce"]


@register_loss("dice_ce")
def dice_ce(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> nn.Module:
    """MONAI ``DiceCELoss``: soft Dice over foreground labels (batch Dice, as nnU-Net) + cross-entropy."""
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=True,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
    )
