"""The sliding-window engine: windows ordered along one axis, logits accumulated in a slab only as deep as a window.

Every dense prediction in medseg (run directories, nnU-Net results folders, validation during training) goes through
:func:`stream_logits`. It places windows on nnU-Net's grid (``compute_steps_for_sliding_window``: evenly spread starts,
step at most ``(1 - overlap) x window``), weights each window's logits by nnU-Net's Gaussian (sigma = window / 8,
centre at ``size // 2``), optionally averages mirrored passes (test-time augmentation over chosen axis subsets), and
yields the weighted mean logits plane range by plane range as soon as no later window touches them. The buffer holds
``C_out x window_depth x (other axes)`` values (float16 by default, as nnU-Net), never the whole image per class.

Because the Gaussian is separable and the windows form a Cartesian grid, the sum of weights at a voxel is the product
of three 1D sums: no weight volume is stored.

Callers turn the yielded chunks into labels on the input grid with :class:`medseg.inference.gridmap.LabelSink`, or
concatenate them with :func:`full_logits` for small images (validation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from medseg.core.errors import ConfigError

__all__ = [
    "EngineSettings",
    "Forward",
    "full_logits",
    "importance_weights",
    "mirror_subsets",
    "parse_mirror_axes",
    "stream_logits",
    "trim_heap",
    "window_count",
    "window_starts",
]

#: A network pass: windows ``(B, C_in, *P)`` -> logits ``(B, C_out, *P)`` (float32 or lower).
Forward = Callable[[torch.Tensor], torch.Tensor]
#: Called as ``progress(windows_done, windows_total)``.
Progress = Callable[[int, int], None]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> None:
    """Give freed heap memory back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so later arrays of tens of MiB come from the heap, and freed
    heap pages stay resident: without a trim, the resident size of a prediction creeps up chunk after chunk.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_AXIS_NAMES = {"x": 0, "y": 1, "z": 2}


def parse_mirror_axes(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """The spatial axes test-time augmentation mirrors, from ``--tta-axes``: ``"x,z"``, ``"0,2"`` or ``[0, 2]`` ->
    ``(0, 2)``; ``"all"`` or ``None`` -> ``None`` (every axis the model allows). ``x, y, z`` are the first, second
    and third voxel axes of the network's grid (in a run directory's RAS grid: left-right, back-front, down-up).

    Raises:
        ConfigError: an unknown axis name or index, or no axis at all.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    items = [v.strip().lower() for v in value.split(",")] if isinstance(value, str) else list(value)
    axes = set()
    for item in items:
        axis = _AXIS_NAMES.get(item) if isinstance(item, str) and not item.isdigit() else int(item)
        if axis is None or not 0 <= axis <= 2:
            raise ConfigError(
                f"--tta-axes {value!r}: {item!r} is not a spatial axis",
                expected="a comma-separated list of x, y, z (or 0, 1, 2), or all",
                hint="e.g. --tta-axes x (2 passes) or --tta-axes all (8 passes in 3D)",
            )
        axes.add(axis)
    if not axes:
        raise ConfigError(f"--tta-axes {value!r} names no axis", expected="x, y, z (comma-separated) or all")
    return tuple(sorted(axes))


def mirror_subsets(axes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Every subset of ``axes`` (spatial, 0-based), the empty one first: nnU-Net's mirroring over those axes."""
    unique = sorted(set(int(a) for a in axes))
    return tuple(c for r in range(len(unique) + 1) for c in itertools.combinations(unique, r))


@dataclass(frozen=True)
class EngineSettings:
    """How windows are placed, weighted and accumulated.

    Attributes:
        roi_size: window size per spatial axis.
        overlap: fraction of a window shared with its neighbour, in [0, 1) (nnU-Net's step 0.5 = overlap 0.5).
        batch_size: windows per network pass.
        blend: ``gaussian`` (nnU-Net's importance map) or ``constant``.
        mirrors: mirror passes, each a tuple of spatial axes (0-based) to flip; ``((),)`` = no test-time
            augmentation. :func:`mirror_subsets` builds nnU-Net's set from the mirrored axes.
        accumulate: dtype of the slab buffer (``float16`` halves its memory; nnU-Net accumulates in float16 too).
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    batch_size: int = 1
    blend: Literal["gaussian", "constant"] = "gaussian"
    mirrors: tuple[tuple[int, ...], ...] = field(default=((),))
    accumulate: Literal["float16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap {self.overlap} is outside [0, 1)", hint="e.g. overlap 0.5 (nnU-Net's step 0.5)")
        if self.batch_size < 1 or any(int(r) < 1 for r in self.roi_size):
            raise ConfigError(f"window {self.roi_size} x batch {self.batch_size} is empty", expected="positive sizes")
        if not self.mirrors:
            raise ConfigError("mirrors is empty", expected="((),) for no test-time augmentation")
        for axes in self.mirrors:
            if any(not 0 <= a < len(self.roi_size) for a in axes):
                raise ConfigError(
                    f"mirror axes {axes} do not exist in a {len(self.roi_size)}D window",
                    expected=f"spatial axes 0..{len(self.roi_size) - 1}",
                )

    @property
    def passes(self) -> int:
        """Network passes per window."""
        return len(self.mirrors)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis of ``size >= window`` voxels (nnU-Net's rule, step ``(1 - overlap) x window``)."""
    if size <= window:
        return [0]
    if window == 1:  # a 2D network over the slices of a volume: every slice once
        return list(range(size))
    step = (1.0 - overlap) * window
    n = int(math.ceil((size - window) / step)) + 1
    actual = (size - window) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def _gaussian_1d(window: int) -> np.ndarray:
    delta = np.zeros(window)
    delta[window // 2] = 1.0
    g = gaussian_filter1d(delta, window / 8.0, mode="constant", cval=0.0)
    return g / g.max()


def importance_weights(roi_size: Sequence[int], blend: str) -> list[torch.Tensor]:
    """Per-axis 1D weights whose outer product is the window's importance map (nnU-Net's Gaussian or constant).

    Zeros are replaced by the smallest positive value (as nnU-Net does) so that every voxel gets some weight.
    """
    out = []
    for r in roi_size:
        g = _gaussian_1d(int(r)) if blend == "gaussian" else np.ones(int(r))
        g[g <= 0] = g[g > 0].min()
        out.append(torch.from_numpy(g.astype(np.float32)))
    return out


def _outer(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = vectors[0]
    for v in vectors[1:]:
        out = out[..., None] * v
    return out


def window_count(shape: Sequence[int], settings: EngineSettings) -> int:
    """Windows the engine runs over spatial ``shape`` (before mirroring)."""
    padded = [max(int(s), int(r)) for s, r in zip(shape, settings.roi_size, strict=True)]
    return math.prod(len(window_starts(s, r, settings.overlap)) for s, r in zip(padded, settings.roi_size, strict=True))


def _slab_axis(shape: Sequence[int], roi: Sequence[int]) -> int:
    """The axis whose slab (window depth x the other axes) is smallest relative to the image."""
    return int(np.argmax([s / r for s, r in zip(shape, roi, strict=True)]))


@torch.inference_mode()
def stream_logits(
    forward: Forward,
    image: torch.Tensor,
    settings: EngineSettings,
    *,
    slab_axis: int | None = None,
    progress: Progress | None = None,
    importance_map: torch.Tensor | None = None,
    half_weights: bool = False,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Weighted mean logits of ``forward`` over ``image``, yielded plane range by plane range along one axis.

    Args:
        forward: windows ``(B, C_in, *P)`` -> logits ``(B, C_out, *P)``.
        image: ``(C_in, *S)`` (2D or 3D); smaller than the window on an axis: zero-padded symmetrically (as nnU-Net)
            and cropped back.
        settings: window placement, weighting, mirroring and accumulation.
        slab_axis: spatial axis (0-based) the windows are ordered along; default: the one that keeps the buffer
            smallest.
        progress: called after each window batch with ``(done, total)``.
        importance_map: the window's weights ``(*P)`` instead of :func:`importance_weights`' product.
        half_weights: sum the weights in a float16 slab and divide in float16, as ``nnUNetPredictor`` does on the
            CPU (with its ``importance_map``, the masks then equal nnU-Net's voxel for voxel). Needs
            ``accumulate="float16"``.

    Yields:
        ``(axis, start, logits)``: ``logits`` are float32 ``(C_out, *S)`` except along ``axis``, where they cover
        planes ``start .. start + n - 1``. Consecutive chunks tile the whole axis in increasing order.
    """
    dims = image.ndim - 1
    roi = tuple(int(r) for r in settings.roi_size)
    if len(roi) != dims:
        raise ConfigError(f"a {len(roi)}D window {roi} cannot slide over a {dims}D image {tuple(image.shape[1:])}")
    shape = tuple(int(s) for s in image.shape[1:])
    pad_lo = [max(r - s, 0) // 2 for s, r in zip(shape, roi, strict=True)]
    if any(s < r for s, r in zip(shape, roi, strict=True)):
        pads: list[int] = []
        for s, r, lo in reversed(list(zip(shape, roi, pad_lo, strict=True))):
            pads += [lo, max(r - s, 0) - lo]
        image = torch.nn.functional.pad(image, pads)
    padded = tuple(int(s) for s in image.shape[1:])
    axis = _slab_axis(padded, roi) if slab_axis is None else int(slab_axis)
    starts = [window_starts(s, r, settings.overlap) for s, r in zip(padded, roi, strict=True)]
    weights_1d = importance_weights(roi, settings.blend)
    importance = _outer(weights_1d) if importance_map is None else importance_map.float().reshape(roi)
    if half_weights and settings.accumulate != "float16":
        raise ConfigError("half_weights needs accumulate='float16'")
    # The sum of weights along each axis (separable: the product of these is the weight sum at a voxel).
    sums = []
    for a in range(dims):
        total = torch.zeros(padded[a])
        for s in starts[a]:
            total[s : s + roi[a]] += weights_1d[a]
        sums.append(total)

    others = [a for a in range(dims) if a != axis]
    other_positions = list(itertools.product(*(starts[a] for a in others)))
    n_total = len(starts[axis]) * len(other_positions)
    dtype = torch.float16 if settings.accumulate == "float16" else torch.float32
    buffer: torch.Tensor | None = None
    depth = roi[axis]
    weight_buffer = (
        torch.zeros((*padded[:axis], depth, *padded[axis + 1 :]), dtype=torch.float16) if half_weights else None
    )
    half_importance = importance.half()
    done = 0
    emitted = 0  # planes of the padded axis already yielded

    def run(batch: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for flip in settings.mirrors:
            flip_dims = [a + 2 for a in flip]
            x = torch.flip(batch, flip_dims) if flip_dims else batch
            y = forward(x).float()
            y = torch.flip(y, flip_dims) if flip_dims else y
            total = y if total is None else total.add_(y)
        assert total is not None
        return total / len(settings.mirrors) if len(settings.mirrors) > 1 else total

    plane_values = math.prod(padded) // padded[axis]

    def chunk(n: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield the first ``n`` buffer planes (trimmed of padding), normalised by the weight sums.

        In pieces whose float32 copy stays near 256 MiB, so that many classes do not multiply the peak memory.
        """
        nonlocal emitted
        assert buffer is not None
        piece = max(1, min(n, (256 * 2**20) // (4 * buffer.shape[0] * plane_values)))
        for offset in range(0, n, piece):
            m = min(piece, n - offset)
            if weight_buffer is not None:  # nnU-Net's float16 division by float16 weight sums
                planes = (buffer.narrow(axis + 1, offset, m) / weight_buffer.narrow(axis, offset, m)).float()
            else:
                planes = buffer.narrow(axis + 1, offset, m).float()
                weight = torch.ones(())
                for a in range(dims):
                    vec = sums[a][emitted : emitted + m] if a == axis else sums[a]
                    view = [1] * (dims + 1)
                    view[a + 1] = vec.numel()
                    weight = weight * vec.reshape(view)
                planes = planes / weight
                if dtype == torch.float16:  # the mean logits at the buffer's precision
                    planes = planes.half().float()
            lo, hi = emitted, emitted + m
            emitted = hi
            keep_lo, keep_hi = max(lo, pad_lo[axis]), min(hi, pad_lo[axis] + shape[axis])
            if keep_hi <= keep_lo:
                continue
            planes = planes.narrow(axis + 1, keep_lo - lo, keep_hi - keep_lo)
            for a in others:
                planes = planes.narrow(a + 1, pad_lo[a], shape[a])
            yield axis, keep_lo - pad_lo[axis], planes

    for i, s0 in enumerate(starts[axis]):
        slab = image.narrow(axis + 1, s0, depth)
        for b in range(0, len(other_positions), settings.batch_size):
            group = other_positions[b : b + settings.batch_size]
            windows = []
            for pos in group:
                w = slab
                for a, p in zip(others, pos, strict=True):
                    w = w.narrow(a + 1, p, roi[a])
                windows.append(w)
            logits = run(torch.stack(windows)).mul_(importance)
            if buffer is None:
                buffer = torch.zeros((logits.shape[1], *padded[:axis], depth, *padded[axis + 1 :]), dtype=dtype)
            for pos, out in zip(group, logits, strict=True):
                target = buffer
                for a, p in zip(others, pos, strict=True):
                    target = target.narrow(a + 1, p, roi[a])
                target += out.to(dtype)
                if weight_buffer is not None:
                    weights = weight_buffer
                    for a, p in zip(others, pos, strict=True):
                        weights = weights.narrow(a, p, roi[a])
                    weights += half_importance
            done += len(group)
            del logits, windows, out
            trim_heap()  # the network's freed activations: back to the system before the next window
            if progress is not None:
                progress(done, n_total)
        assert buffer is not None
        if i + 1 < len(starts[axis]):
            step = starts[axis][i + 1] - s0
            yield from chunk(step)
            # Shift the unfinished planes to the front, in non-overlapping pieces, and clear the rest.
            for src in range(step, depth, step):
                n = min(step, depth - src)
                buffer.narrow(axis + 1, src - step, n).copy_(buffer.narrow(axis + 1, src, n))
                if weight_buffer is not None:
                    weight_buffer.narrow(axis, src - step, n).copy_(weight_buffer.narrow(axis, src, n))
            buffer.narrow(axis + 1, depth - step, step).zero_()
            if weight_buffer is not None:
                weight_buffer.narrow(axis, depth - step, step).zero_()
        else:
            yield from chunk(depth)


def full_logits(
    forward: Forward, image: torch.Tensor, settings: EngineSettings, progress: Progress | None = None
) -> torch.Tensor:
    """All of :func:`stream_logits` at once: float32 logits ``(C_out, *S)`` for ``image (C_in, *S)``."""
    parts = list(stream_logits(forward, image, settings, progress=progress))
    axis = parts[0][0]
    return torch.cat([p for _, _, p in parts], dim=axis + 1)
