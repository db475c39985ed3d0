"""Make ``nnunetv2`` importable next to the CPU build of PyTorch (``docs/environment.md``, "torchvision").

nnunetv2 → dynamic-network-architectures (Primus) → timm → torchvision. The PyPI torchvision wheel is built
against CUDA torch; with the CPU torch its ``_C`` extension never loads, so none of its ``torchvision::*`` operators
exist, and ``import torchvision`` dies in ``torchvision/_meta_registrations.py`` with ``operator torchvision::nms
does not exist`` (it registers fake kernels for ``nms``/``qnms`` without checking that the ops loaded). nnU-Net walks
every trainer module when it looks a trainer up by name, so this import happens on every training and prediction.

:func:`ensure_nnunet_importable` imports torchvision once; if it fails for that reason it defines the missing
operator *schemas* (no kernels: torchvision's own ops stay unusable, which nnU-Net never calls), drops the half-imported
modules and retries. A torchvision whose ``_C`` loads is imported untouched — defining the schemas first would
collide with its own registration — so the shim is a no-op on a matching CUDA install. It is idempotent and must run
before the first ``import nnunetv2``; every module of :mod:`medseg.integrations.nnunet` calls it first.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from typing import Any

from medseg.core.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ensure_nnunet_importable"]

#: Schemas of the torchvision operators that its Python side touches at import time (torchvision 0.2x).
_TORCHVISION_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_INSTALL_HINT = "install the nnU-Net extra (`pip install medseg[nnunet]`, which pulls nnunetv2>=2.8)"

# The Library object owns the definitions: dropping it would unregister them, so it lives as long as the process.
_library: Any = None
_defined: set[str] = set()
_ready = False


def ensure_nnunet_importable() -> None:
    """Import torchvision (defining missing operator schemas if needed) and check that ``nnunetv2`` imports.

    Safe to call many times; only the first call does work (≈ 1–3 s, mostly torchvision's own import).

    Raises:
        ConfigError: nnunetv2 is not installed, or torchvision fails for a reason the shim does not know.

    Examples::

        >>> ensure_nnunet_importable()
        >>> from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    """
    global _ready
    if _ready:
        return
    _import_torchvision()
    try:
        importlib.import_module("nnunetv2")
    except ImportError as err:
        raise ConfigError(
            f"nnunetv2 cannot be imported ({err})", expected="nnunetv2 2.8.x installed", hint=_INSTALL_HINT
        ) from err
    _ready = True


def _import_torchvision() -> None:
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "ops"):
        return  # imported completely before (by us or by the user)
    if importlib.util.find_spec("torchvision") is None:
        return  # nnU-Net's default networks do not need it; Primus-based trainers will fail on their own
    for _ in range(len(_TORCHVISION_SCHEMAS) + 1):
        try:
            importlib.import_module("torchvision")
            return
        except RuntimeError as err:
            match = _MISSING_OP.search(str(err))
            _drop_partial_import()
            if match is None or match.group(1) not in _TORCHVISION_SCHEMAS or match.group(1) in _defined:
                raise ConfigError(
                    f"torchvision cannot be imported ({err})",
                    expected="a torchvision build that matches the installed torch",
                    hint="install the torchvision wheel built for your torch, or report the missing operator",
                ) from err
            _define(match.group(1))


def _define(op: str) -> None:
    global _library
    import torch

    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
    _library.define(_TORCHVISION_SCHEMAS[op])
    _defined.add(op)
    logger.debug("defined schema torchvision::%s so that torchvision imports with the CPU torch", op)


def _drop_partial_import() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
