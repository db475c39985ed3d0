"""The one model registry: ``register_model``, ``create_model``, ``list_models``, ``get_card``.

A network family registers a builder with its card. ``create_model(name, **overrides)`` builds it; overrides
that match card fields (``in_channels``, ``out_channels``, ``label_names``, ``roi_size``) update the card that
travels with the model as ``model.card``. A builder whose input contract depends on its keyword arguments (e.g. the
U-Net's strides) sets ``model.divisible_by`` on the module it returns; ``create_model`` copies it into the card.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medseg.core.errors import ConfigError
from medseg.core.registry import Registry
from medseg.models.card import ModelCard

# Every module of ``medseg.models`` registers its networks when imported, except these infrastructure modules;
# a new family is a new file, with no list to edit.
_INFRASTRUCTURE = {"card", "checkpoint", "checks", "registry"}


@dataclass(frozen=True)
class _Entry:
    card: ModelCard
    builder: Callable[..., nn.Module]
    tiny: dict[str, Any]


_MODELS: Registry[_Entry] = Registry("model")
_CARD_FIELDS = {"in_channels", "out_channels", "label_names", "roi_size", "target_spacing", "intensity_preset"}


def register_model(
    card: ModelCard, tiny: dict[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Register ``builder(in_channels, out_channels, **kwargs) -> nn.Module`` under ``card.name``.

    Args:
        card: the network's card (paper configuration).
        tiny: keyword overrides that make a small, fast variant for tests (same structure).
    """

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.add(card.name, _Entry(card, builder, dict(tiny or {})))
        return builder

    return deco


def _load_families() -> None:
    package = importlib.import_module("medseg.models")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"medseg.models.{info.name}")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_families()
    return _MODELS.names()


def get_card(name: str) -> ModelCard:
    """The card of model ``name`` (raises ``ConfigError`` with a suggestion for unknown names)."""
    _load_families()
    return _MODELS.get(name).card


def tiny_overrides(name: str) -> dict[str, Any]:
    """Keyword overrides of the model's tiny test variant."""
    _load_families()
    return dict(_MODELS.get(name).tiny)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build model ``name``; the returned module carries its (updated) card as ``model.card``.

    Args:
        name: registry name, see :func:`list_models`.
        **overrides: card fields (``in_channels``, ``out_channels``, ``label_names``, ...) and builder keyword
            arguments (e.g. ``embed_dims`` for SegFormer3D).

    Raises:
        ConfigError: unknown name, or a keyword the builder does not accept.
    """
    _load_families()
    entry = _MODELS.get(name)
    card_changes = {k: overrides.pop(k) for k in list(overrides) if k in _CARD_FIELDS}
    card = entry.card.replace(**card_changes)
    if "label_names" in card_changes and "out_channels" not in card_changes:
        card = card.replace(out_channels=len(card.label_names))
    if len(card.label_names) != card.out_channels:
        names = tuple(card.label_names[: card.out_channels]) + tuple(
            f"label_{i}" for i in range(len(card.label_names), card.out_channels)
        )
        card = card.replace(label_names=names)
    for key in ("roi_size", "target_spacing", "label_names"):
        value = getattr(card, key)
        if value is not None and not isinstance(value, tuple):
            card = card.replace(**{key: tuple(value)})
    # Check the keywords against the builder's signature instead of catching TypeError around the call, which would
    # also turn a genuine bug inside the builder into a misleading "does not accept" message.
    try:
        inspect.signature(entry.builder).bind(in_channels=card.in_channels, out_channels=card.out_channels, **overrides)
    except TypeError as exc:
        raise ConfigError(
            f"model {name!r} does not accept the options {sorted(overrides)}: {exc}",
            hint=f"see the docstring of the {name} builder for its keyword arguments",
        ) from None
    model = entry.builder(in_channels=card.in_channels, out_channels=card.out_channels, **overrides)
    divisible_by = getattr(model, "divisible_by", None)
    if divisible_by is not None and tuple(divisible_by) != card.divisible_by:
        card = card.replace(divisible_by=tuple(int(k) for k in divisible_by))
    img_size = getattr(model, "img_size", None)
    if card.needs_prompts and isinstance(img_size, int) and card.roi_size != (img_size,) * card.spatial_dims:
        card = card.replace(roi_size=(img_size,) * card.spatial_dims)  # a prompted model's input side is its size
    model.card = card  # type: ignore[assignment]
    model.model_kwargs = dict(overrides)  # type: ignore[assignment]
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
