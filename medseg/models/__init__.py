"""The network zoo: one file per family, one registry, one card each."""

from medseg.models.card import ModelCard
from medseg.models.registry import count_parameters, create_model, get_card, list_models, register_model, tiny_overrides

__all__ = [
    "ModelCard",
    "count_parameters",
    "create_model",
    "get_card",
    "list_models",
    "register_model",
    "tiny_overrides",
]
