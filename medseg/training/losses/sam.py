"""Losses of the promptable SAM models; they take one logit channel ``(B, 1, H, W)`` and a binary target.

* ``sam_dice_ce`` — DB-SAM (arXiv 2410.04172): MONAI ``DiceCELoss`` with sigmoid and squared denominators,
  background included, mean reduction; with one channel MONAI's CE term is binary cross-entropy with logits.
  Computed in float32 as the release does under mixed precision.
* ``sam_focal_dice`` — SAM-UNet (arXiv 2408.09886): focal loss (gamma 2, alpha 0.25, mean over pixels) plus
  20 x soft Dice (sigmoid, smoothing 1) **pooled over the batch**, as the official code's ``DiceLoss(batch=True)``:
  one Dice over all pixels of all masks of the batch, not a mean of per-mask Dice values.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss
from torch import nn

from medseg.training.losses.registry import register_loss


class _Float32(nn.Module):
    """Evaluate ``loss`` in float32 whatever the autocast dtype of the logits."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return self.loss(logits.float(), target.float())


class FocalDiceLoss(nn.Module):
    """``focal + dice_weight * dice`` on sigmoid probabilities of ``(B, 1, H, W)`` logits.

    Args:
        gamma: focal exponent.
        alpha: focal weight of the foreground class (``1 - alpha`` for background).
        dice_weight: weight of the soft Dice term.
        batch_dice: one Dice over all pixels of the batch (the official SAM-UNet loss); ``False`` averages the Dice
            of each mask.
    """

    def __init__(
        self, gamma: float = 2.0, alpha: float = 0.25, dice_weight: float = 20.0, batch_dice: bool = True
    ) -> None:
        super().__init__()
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="mean")
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=batch_dice, reduction="mean")
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits ``(B, 1, H, W)`` against a binary target ``(B, 1, H, W)``."""
        return self.focal(logits, target) + self.dice_weight * self.dice(logits, target)


@register_loss("sam_dice_ce")
def sam_dice_ce() -> nn.Module:
    """DB-SAM's segmentation loss (sigmoid Dice with squared denominators + binary cross-entropy)."""
    return _Float32(DiceCELoss(sigmoid=True, squared_pred=True, include_background=True, reduction="mean"))


@register_loss("sam_focal_dice")
def sam_focal_dice(dice_weight: float = 20.0) -> nn.Module:
    """SAM-UNet's loss: focal (gamma 2, alpha 0.25) + ``dice_weight`` x soft Dice pooled over the batch."""
    return _Float32(FocalDiceLoss(dice_weight=dice_weight))
