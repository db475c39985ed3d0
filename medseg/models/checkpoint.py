"""Reading local weights files and loading state dicts, with a clear report of what does not fit."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medseg.core.errors import WeightsError

#: Key prefixes that DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add to a wrapped model's state dict.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MB chunks (official checkpoints reach several GB)."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def unwrap_state_dict(obj: Any, containers: Sequence[str]) -> Any:
    """The state dict inside a checkpoint object: the first of ``containers`` holding a mapping, else ``obj``."""
    if isinstance(obj, Mapping):
        for key in containers:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def strip_wrapper_prefixes(key: str) -> str:
    """``key`` without the :data:`WRAPPER_PREFIXES` a wrapped model added."""
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def read_weights_file(
    path: str | Path,
    *,
    kind: str,
    sha256: str | None = None,
    containers: Sequence[str] = ("state_dict",),
    expected: str = "a state dict of tensors (torch.save(model.state_dict(), ...))",
    hint: str | None = None,
    allow_numpy: bool = False,
) -> dict[str, Tensor]:
    """Read a local weights file with ``torch.load(weights_only=True)`` into a flat state dict on the CPU.

    The state dict may be bare or under one of ``containers``; DDP / ``torch.compile`` key prefixes are removed.

    Args:
        path: the file.
        kind: what the file holds, for messages (``"SAM"``, ``"STU-Net"``, ``"ResNet"``).
        sha256: expected hex digest of the file, checked before reading.
        containers: keys a checkpoint dict may keep the state dict under, tried in order.
        expected: what a readable file holds, for the message when ``torch.load`` refuses it.
        hint: how to get a right file, for the messages of a missing file or one without a state dict.
        allow_numpy: allow the numpy scalars and arrays nnU-Net checkpoints log (:func:`numpy_safe_globals`).

    Raises:
        WeightsError: missing or unreadable file, digest mismatch, or no non-empty state dict of tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{kind} checkpoint {path} does not exist or is not a file",
            expected=f"a local {kind} weights file",
            hint=hint or "pass the path of a local .pth / .pt file",
            path=path,
        )
    if sha256 is not None:
        digest = file_sha256(path)
        if digest.lower() != sha256.lower():
            raise WeightsError(
                f"{kind} checkpoint {path} has sha256 {digest}",
                expected=f"sha256 {sha256}",
                hint="the file is corrupt or not the one you meant; download it again",
                path=path,
            )
    try:
        with torch.serialization.safe_globals(numpy_safe_globals() if allow_numpy else []):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot read {path} as a weights-only torch checkpoint ({first})",
            expected=expected,
            hint="if you trust the file, re-save just its weights: torch.save(torch.load(f, weights_only=False)"
            f"[{' or '.join(repr(k) for k in containers)}], 'weights.pth')",
            path=path,
        ) from None
    obj = unwrap_state_dict(obj, containers)
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(map(str, obj)) if isinstance(obj, Mapping) else [type(obj).__name__]
        shown = ", ".join(found[:10]) + (" ..." if len(found) > 10 else "")
        raise WeightsError(
            f"{path} holds no {kind} state dict (found {shown or 'an empty dict'})",
            expected=f"a bare state dict of tensors, or one under {' / '.join(repr(k) for k in containers)}",
            hint=hint,
            path=path,
        )
    return {strip_wrapper_prefixes(str(k)): v for k, v in obj.items()}
