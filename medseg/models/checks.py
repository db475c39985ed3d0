"""Input checks shared by the networks of the zoo.

Every network calls :func:`check_input` first in ``forward`` so a tensor that breaks the model's contract fails with
one readable :class:`~medseg.core.errors.ModelInputError` (naming the model and the rule) instead of a shape error
deep inside a convolution or a reshape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medseg.core.errors import ModelInputError

_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _axis_names(spatial_dims: int) -> tuple[str, ...]:
    return _AXIS_NAMES.get(spatial_dims, tuple(f"S{i}" for i in range(spatial_dims)))


def check_input(
    x: Tensor, *, name: str, in_channels: int, spatial_dims: int, divisible_by: Sequence[int] | int
) -> None:
    """Raise ``ModelInputError`` unless ``x`` fits the model's input contract.

    The contract is: a tensor of shape ``(B, C_in, *S)`` with ``len(S) == spatial_dims`` (e.g. ``(B, C, D, H, W)``
    for 3D), ``C_in == in_channels`` and every spatial size a multiple of ``divisible_by`` on its axis.

    Args:
        x: the network input, ``(B, C_in, D, H, W)`` for 3D or ``(B, C_in, H, W)`` for 2D.
        name: registry name of the model, used as the message prefix (``"segformer3d"``).
        in_channels: the channel count the model was built for.
        spatial_dims: number of spatial axes (2 or 3).
        divisible_by: per-axis divisor (an int applies to every axis).

    Raises:
        ModelInputError: wrong type, number of dimensions, channel count, empty axis or indivisible spatial size.

    Examples::

        >>> check_input(torch.zeros(1, 4, 64, 64, 64), name="segformer3d", in_channels=4, spatial_dims=3,
        ...             divisible_by=(32, 32, 32))
    """
    divisors = (divisible_by,) * spatial_dims if isinstance(divisible_by, int) else tuple(divisible_by)
    if len(divisors) != spatial_dims:
        raise ValueError(f"divisible_by has {len(divisors)} entries, expected spatial_dims={spatial_dims}")
    axes = _axis_names(spatial_dims)
    layout = f"(B, C, {', '.join(axes)})"

    if not isinstance(x, torch.Tensor):
        raise ModelInputError(
            f"{name}: input is a {type(x).__name__}, not a torch.Tensor",
            expected=f"a tensor of shape {layout}",
            hint="convert with torch.as_tensor(...) and add batch and channel axes",
        )
    shape = tuple(x.shape)
    if x.ndim != spatial_dims + 2:
        hint = "add a batch axis with x[None]" if x.ndim == spatial_dims + 1 else "reshape the input to " + layout
        raise ModelInputError(
            f"{name}: input has {x.ndim} dimensions (shape {shape})",
            expected=f"a {spatial_dims + 2}-D tensor {layout}",
            hint=hint,
        )
    channels = shape[1]
    if channels != in_channels:
        plural = "" if channels == 1 else "s"
        raise ModelInputError(
            f"{name}: got {channels} channel{plural}, expected {in_channels} (input shape {shape})",
            expected=f"input shape (B, {in_channels}, {', '.join(axes)}), the model's in_channels",
            hint=f"check the input modalities, or build the model with create_model({name!r}, in_channels={channels})",
        )
    spatial = shape[2:]
    if any(s == 0 for s in spatial) or shape[0] == 0:
        raise ModelInputError(f"{name}: input shape {shape} has an empty axis", expected="every axis of size >= 1")
    bad = [i for i, (s, k) in enumerate(zip(spatial, divisors, strict=True)) if s % k]
    if bad:
        if len(set(divisors)) == 1:
            rule = f"each of {', '.join(axes)} a multiple of {divisors[0]}"
            div = f"by {divisors[0]}"
        else:
            rule = ", ".join(f"{a} a multiple of {k}" for a, k in zip(axes, divisors, strict=True))
            div = "by " + " / ".join(str(divisors[i]) for i in bad)
        where = "axis" if len(bad) == 1 else "axes"
        where_idx = ", ".join(f"{i} ({axes[i]})" for i in bad)
        padded = tuple(math.ceil(s / k) * k for s, k in zip(spatial, divisors, strict=True))
        raise ModelInputError(
            f"{name}: input spatial shape {spatial} is not divisible {div} on {where} {where_idx}",
            expected=rule,
            hint=f"pad or crop the input, e.g. pad to {padded} (sliding-window inference does this for you)",
        )


PROMPT_SHAPES = "boxes (B, 4) and / or points ((B, N, 2), (B, N)) in pixels of the model input"


def check_prompts(
    batch: int,
    boxes: Tensor | None,
    points: tuple[Tensor, Tensor] | None,
    *,
    name: str,
    required: bool = True,
) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
    """Raise ``ModelInputError`` unless box / point prompts fit a batch of ``batch`` images.

    Args:
        batch: number of images ``B``.
        boxes: ``(B, 4)`` as ``(x0, y0, x1, y1)`` pixels of the model input, or ``None``.
        points: ``(coords (B, N, 2), labels (B, N))`` with ``(x, y)`` pixels and labels 1 / 0 (-1 padding), or ``None``.
        name: the model's name, used as the message prefix.
        required: at least one of ``boxes`` / ``points`` must be given.

    Returns:
        ``(boxes, points)`` with ``points`` as a tuple.
    """
    if required and boxes is None and points is None:
        raise ModelInputError(
            f"{name}: no prompt given",
            expected=PROMPT_SHAPES,
            hint="pass boxes=... (x0, y0, x1, y1) or points=(coords, labels) by keyword",
        )
    if boxes is not None and (not isinstance(boxes, Tensor) or tuple(boxes.shape) != (batch, 4)):
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ModelInputError(
            f"{name}: boxes have shape {got} for a batch of {batch}",
            expected=f"boxes ({batch}, 4) as (x0, y0, x1, y1), one box per image",
        )
    if points is not None:
        ok = isinstance(points, tuple | list) and len(points) == 2 and all(isinstance(p, Tensor) for p in points)
        if ok:
            coords, labels = points
            ok = (
                coords.ndim == 3
                and coords.shape[0] == batch
                and coords.shape[1] > 0
                and coords.shape[2] == 2
                and tuple(labels.shape) == tuple(coords.shape[:2])
            )
        if not ok:
            got = (
                tuple(tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__ for p in points)
                if isinstance(points, tuple | list)
                else type(points).__name__
            )
            raise ModelInputError(
                f"{name}: points are {got} for a batch of {batch}",
                expected=f"points (({batch}, N, 2), ({batch}, N)): (x, y) coordinates and labels 1 / 0",
            )
        points = (points[0], points[1])
    return boxes, points


def check_prompted_input(
    x: Tensor, *, name: str, size: int, boxes: Tensor | None, points: tuple[Tensor, Tensor] | None
) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
    """The prompted-model contract: ``x (B, 3, S, S)`` with ``S = size`` and at least one well-shaped prompt.

    Returns:
        ``boxes`` in ``x``'s dtype and ``points`` as ``(coords in x's dtype, labels int64)``.
    """
    check_input(x, name=name, in_channels=3, spatial_dims=2, divisible_by=(16, 16))
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        raise ModelInputError(
            f"{name}: input is {h}x{w}, expected {size}x{size}",
            hint=f"the prompted predictor resizes the longest side to {size} and pads",
        )
    boxes, points = check_prompts(x.shape[0], boxes, points, name=name)
    if boxes is not None:
        boxes = boxes.to(x.dtype)
    if points is not None:
        points = (points[0].to(x.dtype), points[1].to(torch.int64))
    return boxes, points
