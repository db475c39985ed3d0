"""Loading state dicts with a clear report of what does not fit."""

from __future__ import annotations

from collections.abc import Mapping

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
