"""Errors, keys, registries and configuration schemas shared by every room of medseg."""

from medseg.core.errors import ConfigError, DataError, MedsegError, ModelInputError, WeightsError
from medseg.core.registry import Registry, did_you_mean

__all__ = ["ConfigError", "DataError", "MedsegError", "ModelInputError", "Registry", "WeightsError", "did_you_mean"]
