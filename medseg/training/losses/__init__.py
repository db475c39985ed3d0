"""Training losses: one registry (:mod:`~medseg.training.losses.registry`), one module per loss family.

``from medseg.training.losses import LOSSES, build_loss`` is the public face; ``build_loss("mpunet_hybrid")`` works
whatever was imported before, because the registry imports the families on its first lookup.
"""

from medseg.training.losses.dense import dice_ce
from medseg.training.losses.registry import (
    LOSSES,
    DeepSupervisionLoss,
    build_loss,
    deep_supervision_weights,
    register_loss,
)

__all__ = ["LOSSES", "DeepSupervisionLoss", "build_loss", "deep_supervision_weights", "dice_ce", "register_loss"]
