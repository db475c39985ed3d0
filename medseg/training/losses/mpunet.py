"""MPU-Net's hybrid loss, registered as ``mpunet_hybrid`` in :data:`medseg.training.losses.LOSSES`.

The MPU-Net abstract (Yu, Han, Song, arXiv:2307.05799) says only that the authors' hybrid loss "can better exploit
high-resolution characteristic information"; its terms and weights are not stated. This module is the documented
assumption used by medseg's re-implementation (:mod:`medseg.models.mpunet`):

    ``L = sum_k w_k * (Dice_k + CE_k) / sum_k w_k`` with ``w = (1, 0.5, 0.25, 0.125, ...)``,

``k = 0`` the main (full-resolution) output and ``k >= 1`` the deep-supervision outputs from the finest to the
coarsest decoder level (each halving), so the main output carries 1 / 1.875 = 53 % of the weight with three auxiliary
outputs. ``Dice + CE`` is MONAI's ``DiceCELoss`` with the same settings as medseg's ``dice_ce`` (softmax, one-hot
target, batch soft Dice over the foreground labels, equal Dice / CE weights), so the U-Net baseline and MPU-Net differ
only in the network and the supervision.

"High resolution" is read as: every output is compared with the **full-resolution** target. An output smaller than
the target is (tri)linearly upsampled to it (its logits), instead of nearest-downsampling the target as
:class:`~medseg.training.losses.DeepSupervisionLoss` does, because small tumours vanish from a downsampled target.
These weights are MPU-Net's own and differ from nnU-Net's deep-supervision rule that
:class:`~medseg.training.losses.DeepSupervisionLoss` applies to the other networks (there the coarsest output gets
weight 0): here every auxiliary output counts, the coarsest included.

The loss takes the whole list of outputs itself (``handles_deep_supervision = True``); wrapped in
``DeepSupervisionLoss`` it still works (it then receives one tensor at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ConfigError
from medseg.training.losses.dense import dice_ce
from medseg.training.losses.registry import register_loss

__all__ = ["MPUNetHybridLoss", "mpunet_hybrid"]


class MPUNetHybridLoss(nn.Module):
    """Dice + CE on the main output plus down-weighted Dice + CE on each deep-supervision output.

    Args:
        aux_weights: weight of auxiliary output ``k`` (``k = 1, 2, ...``) relative to the main output's 1; outputs
            beyond the tuple keep halving from its last entry. Default ``(0.5, 0.25, 0.125)``.
        lambda_dice: weight of the Dice term inside each level's loss.
        lambda_ce: weight of the cross-entropy term inside each level's loss.

    Examples::

        >>> loss = MPUNetHybridLoss()
        >>> target = torch.randint(0, 3, (2, 1, 16, 16, 16))
        >>> loss([torch.randn(2, 3, 16, 16, 16) for _ in range(4)], target)
    """

    handles_deep_supervision = True

    def __init__(
        self, aux_weights: Sequence[float] = (0.5, 0.25, 0.125), lambda_dice: float = 1.0, lambda_ce: float = 1.0
    ) -> None:
        super().__init__()
        self.aux_weights = tuple(float(w) for w in aux_weights)
        if not self.aux_weights or min(self.aux_weights) < 0:
            raise ConfigError(f"mpunet_hybrid: aux_weights={aux_weights}", expected="non-empty, each >= 0")
        self.base = dice_ce(lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def weights(self, n_outputs: int) -> list[float]:
        """Un-normalised weights of ``n_outputs`` outputs, main first (e.g. ``[1, 0.5, 0.25, 0.125]`` for 4)."""
        aux = list(self.aux_weights[: n_outputs - 1])
        while len(aux) < n_outputs - 1:
            aux.append(aux[-1] * 0.5)
        return [1.0, *aux]

    def level_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Dice + CE of one output ``(B, C, *s)`` against the full-resolution target ``(B, 1, *S)``.

        A smaller output is (bi/tri)linearly upsampled to the target's size before the loss.
        """
        if logits.shape[2:] != target.shape[2:]:
            mode = {3: "linear", 4: "bilinear"}.get(logits.ndim, "trilinear")
            logits = F.interpolate(logits, size=target.shape[2:], mode=mode, align_corners=False)
        return self.base(logits, target)

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        """Weighted mean of the per-output losses.

        Args:
            outputs: logits ``(B, C, D, H, W)`` or a list of them, the main output first.
            target: labels ``(B, 1, D, H, W)`` at full resolution.

        Returns:
            A scalar tensor.
        """
        if isinstance(outputs, Tensor):
            return self.level_loss(outputs, target)
        outputs = list(outputs)
        weights = self.weights(len(outputs))
        total = sum(weights)
        loss = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs, strict=True):
            if w > 0:
                loss = loss + (w / total) * self.level_loss(out, target)
        return loss


@register_loss("mpunet_hybrid")
def mpunet_hybrid() -> nn.Module:
    """MPU-Net hybrid loss with the default weights (main 1, auxiliary 0.5 / 0.25 / 0.125, normalised)."""
    return MPUNetHybridLoss()
