"""Loading state dicts with a clear report of what does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.core.errors import WeightsError


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` strictly; missing, unexpected or mis-shaped keys raise ``WeightsError`` listing them.

    Args:
        model: the network to load into.
        state: a state dict.
        source: where the weights came from, for the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shaped = [
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shaped:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped)):
            if keys:
                parts.append(f"{len(keys)} {title}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
        layout = ", ".join(list(expected)[:5])
        raise WeightsError(
            f"weights from {source} do not fit {type(model).__name__}: " + "; ".join(parts),
            expected=f"the layout of {type(model).__name__} (first keys: {layout})",
            hint="check that the run's model name and options match the checkpoint",
        )
    model.load_state_dict(state, strict=True)


def numpy_safe_globals() -> list[Any]:
    """Numpy scalar / array reconstruction for ``torch.serialization.safe_globals``.

    nnU-Net checkpoints (and official STU-Net ones) log losses and metrics as numpy values; allowing exactly these
    keeps ``torch.load(weights_only=True)`` usable on them.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtype_types = {type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")}
    # Files pickled under numpy 1 name the functions ``numpy.core.multiarray.*``; register that spelling too.
    return [
        scalar,
        _reconstruct,
        (scalar, "numpy.core.multiarray.scalar"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.dtype,
        np.ndarray,
        *dtype_types,
    ]
