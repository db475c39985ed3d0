"""Loss registry. Losses take ``(logits (B, C, *S) | list of them, target (B, 1, *S))``.

A model with deep supervision returns a list of logits in training, full resolution first; the loss is then the
nnU-Net weighted sum (weights halve per level, normalised to 1) with the target resized by nearest neighbour
to each level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from medseg.core.registry import Registry

LOSSES: Registry[Callable[[], nn.Module]] = Registry("loss")


@LOSSES.register("dice_ce")
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


class DeepSupervisionLoss(nn.Module):
    """Apply ``base`` to a single output or, for a list of outputs, to each level with halving weights.

    Args:
        base: a loss ``(logits (B, C, *S), target (B, 1, *S)) -> scalar``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        weights = torch.tensor([0.5**i for i in range(len(outputs))])
        weights = weights / weights.sum()
        total = outputs[0].new_zeros(())
        for w, out in zip(weights, outputs, strict=True):
            t = (
                target
                if out.shape[2:] == target.shape[2:]
                else F.interpolate(target, size=out.shape[2:], mode="nearest")
            )
            total = total + float(w) * self.base(out, t)
        return total


def build_loss(name: str) -> nn.Module:
    """The registered loss ``name``, wrapped for deep supervision unless it handles output lists itself."""
    loss = LOSSES.get(name)()
    return loss if getattr(loss, "handles_deep_supervision", False) else DeepSupervisionLoss(loss)


# Losses of individual model families register themselves on import.
from medseg.training import losses_mpunet as _losses_mpunet  # noqa: E402,F401
from medseg.training import losses_sam as _losses_sam  # noqa: E402,F401
