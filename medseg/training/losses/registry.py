"""The one loss registry: ``LOSSES``, ``register_loss``, ``build_loss`` and nnU-Net's deep-supervision weighting.

Losses take ``(logits (B, C, *S) | list of them, target (B, 1, *S))``. Every module of the
:mod:`medseg.training.losses` package except this one is a loss family that registers its losses when imported;
the registry imports the families itself on its first lookup (as :mod:`medseg.models.registry` does for networks),
so a family is a new file with no list to edit, and the order in which callers import things does not matter.

A model with deep supervision returns a list of logits in training, full resolution first; unless the loss handles
such lists itself (``handles_deep_supervision = True``), :class:`DeepSupervisionLoss` applies it to each output with
nnU-Net's weights (``0.5 ** i``, the lowest-resolution output 0, normalised to sum 1) and the target resized by
nearest neighbour to each output.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from medseg.core.registry import Registry

__all__ = ["LOSSES", "DeepSupervisionLoss", "build_loss", "deep_supervision_weights", "register_loss"]

_PACKAGE = "medseg.training.losses"
_INFRASTRUCTURE = {"registry"}


def _load_families() -> None:
    """Import every loss-family module of the package (each registers its losses; a second call is a no-op)."""
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{_PACKAGE}.{info.name}")


class _LossRegistry(Registry[Callable[..., nn.Module]]):
    """A :class:`~medseg.core.registry.Registry` that imports the loss families before every lookup."""

    def get(self, name: str) -> Callable[..., nn.Module]:
        _load_families()
        return super().get(name)

    def names(self) -> list[str]:
        _load_families()
        return super().names()

    def __contains__(self, name: object) -> bool:
        _load_families()
        return super().__contains__(name)

    def values(self) -> list[Callable[..., nn.Module]]:
        _load_families()
        return super().values()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        _load_families()
        return super().__len__()


#: Loss name -> factory ``(**kwargs) -> nn.Module``.
LOSSES: Registry[Callable[..., nn.Module]] = _LossRegistry("loss")


def register_loss(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a loss factory under ``name`` (a duplicate name raises ``ConfigError``)."""
    return LOSSES.register(name)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``n_outputs`` outputs, full resolution first.

    ``w_i = 0.5 ** i``, the last (lowest-resolution) output gets 0, normalised to sum 1; e.g. 5 outputs give
    ``[8, 4, 2, 1, 0] / 15``. A single output gets weight 1.
    """
    if n_outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n_outputs}")
    if n_outputs == 1:
        return [1.0]
    weights = [0.5**i for i in range(n_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Apply ``base`` to a single output or, for a list of outputs, to each with nnU-Net's weights.

    See :func:`deep_supervision_weights`; outputs with weight 0 are not evaluated.

    Args:
        base: a loss ``(logits (B, C, *S), target (B, 1, *S)) -> scalar``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Weighted loss of ``outputs`` (``(B, C, *s)`` or a list of them, full resolution first)."""
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        total = outputs[0].new_zeros(())
        for w, out in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
            if w == 0.0:
                continue
            t = (
                target
                if out.shape[2:] == target.shape[2:]
                else F.interpolate(target, size=out.shape[2:], mode="nearest")
            )
            total = total + w * self.base(out, t)
        return total


def build_loss(name: str) -> nn.Module:
    """The registered loss ``name``, wrapped for deep supervision unless it handles output lists itself.

    Raises:
        ConfigError: unknown name (with a suggestion).
    """
    loss = LOSSES.get(name)()
    return loss if getattr(loss, "handles_deep_supervision", False) else DeepSupervisionLoss(loss)
