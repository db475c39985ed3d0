"""Image, mask and box handling for Segment-Anything style 2D models (DB-SAM, SAM-UNet).

SAM models see one 2D slice at a time in a square ``S x S`` frame: the slice is resized so that its longest side is
``S`` (SAM's ``ResizeLongestSide``), normalised with SAM's pixel mean/std and zero-padded at the bottom and right
(Kirillov et al., arXiv 2304.02643). :class:`SamFrame` records that mapping so boxes, points and logits move between
a slice and the model frame.

Axis convention: the slice ``z`` of a volume ``(C, X, Y, Z)`` is the 2D image ``(C, rows=Y, cols=X)``, so a box
``(x0, y0, x1, y1)`` in voxel indices (``x`` the first spatial axis) is directly SAM's ``(x, y)`` box. Boxes are
inclusive index extents: ``x1`` is the last column of the object (as MedSAM builds them, arXiv 2304.12306).

Box prompts from a label follow each paper's rule (:data:`BOX_RULES`, declared by the model as ``box_rule``): DB-SAM
(arXiv 2410.04172) boxes all foreground pixels (``bbox(mask > 0)``, as MedSAM), SAM-UNet (arXiv 2408.09886) the largest
8-connected component (as SAM-Med2D). Training-time box jitter follows the two papers too: DB-SAM enlarges each side
by ``U{0..19}`` pixels on a 256 grid; SAM-UNet translates the box by one random integer offset per axis in
``[-m, m)``, ``m = min(5, int(0.5 * min(w, h)))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from medseg.core.errors import ConfigError, ModelInputError
from medseg.core.registry import did_you_mean
from medseg.models.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD

__all__ = [
    "BOX_JITTER",
    "BOX_RULES",
    "DEFAULT_BOX_RULE",
    "SamFrame",
    "box_from_mask",
    "box_rule_of",
    "enlarge_box",
    "prepare_mask",
    "prepare_slice",
    "sam_intensity",
    "shift_box",
    "slice_to_volume",
    "volume_slice",
]

BoxInt = tuple[int, int, int, int]


def _percentile_scale(image: Tensor, percentiles: tuple[float, float]) -> Tensor:
    values = image.detach().float().cpu().numpy()
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if not hi > lo:  # constant image (or constant within the percentiles): all zeros, no division by zero
        return torch.zeros(image.shape, dtype=torch.float32)
    scaled = (torch.as_tensor(values).clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return scaled.float()


def sam_intensity(image: Tensor, percentiles: tuple[float, float] = (0.5, 99.5)) -> Tensor:
    """Bring an image to SAM's 8-bit RGB range ``[0, 255]``, one scale for the whole image.

    * 1 channel (CT, MRI, grey photos): clipped to the image's ``percentiles`` (computed once over the whole image,
      so every slice shares one scale), scaled to 0-255 and replicated to 3 channels.
    * 3 channels whose values lie in ``[0, 255]`` (RGB photos, histology): kept.
    * 3 channels otherwise: clipped to the percentiles of all channels together and scaled to 0-255.

    A constant image gives zeros.

    Args:
        image: ``(C, X, Y, Z)`` with ``C`` 1 or 3.
        percentiles: lower and upper clipping percentiles (0-100).

    Returns:
        ``(3, X, Y, Z)`` float32 in ``[0, 255]`` (a plain tensor).

    Raises:
        ModelInputError: ``C`` is neither 1 nor 3, or the image is not 4-D.
    """
    if image.ndim != 4:
        raise ModelInputError(f"image has shape {tuple(image.shape)}", expected="a 4-D image (C, X, Y, Z)")
    channels = image.shape[0]
    if channels not in (1, 3):
        raise ModelInputError(
            f"image has {channels} channels; SAM models take 1 (grey) or 3 (RGB) channels",
            hint="give a single grey image or an RGB image",
        )
    plain = image.detach().float().cpu().as_subclass(torch.Tensor)
    if channels == 3 and plain.numel() and float(plain.min()) >= 0.0 and float(plain.max()) <= 255.0:
        return plain.clone()
    scaled = _percentile_scale(plain, percentiles)
    return scaled.expand(3, *scaled.shape[1:]).clone() if channels == 1 else scaled


def volume_slice(volume: Tensor, z: int) -> Tensor:
    """The SAM view of slice ``z``: ``(C, X, Y, Z)`` -> ``(C, rows=Y, cols=X)`` (a transposed view)."""
    return volume[..., z].transpose(-1, -2)


def slice_to_volume(array: Tensor) -> Tensor:
    """Inverse of :func:`volume_slice` for one slice: ``(..., rows=Y, cols=X)`` -> ``(..., X, Y)``."""
    return array.transpose(-1, -2)


@dataclass(frozen=True)
class SamFrame:
    """Where a ``rows x cols`` slice lies in the ``size x size`` model frame.

    The slice is resized to ``(new_rows, new_cols)`` = ``(int(rows * scale + 0.5), int(cols * scale + 0.5))`` with
    ``scale = size / max(rows, cols)`` and placed at the top-left corner; the rest is zero padding.

    Coordinates are pixel indices with pixel ``i`` covering ``[i, i + 1)``. Mapping is pixel-centre aware: index
    ``i`` on an axis scaled by ``s = new_len / old_len`` becomes ``(i + 0.5) * s - 0.5`` (the centre of pixel ``i``
    maps to the centre of the same area), which is what SAM's prompt encoder expects since it adds 0.5 to every
    coordinate before encoding.

    Attributes:
        size: side ``S`` of the square model input.
        rows: slice height (number of rows, ``Y``).
        cols: slice width (number of columns, ``X``).
        scale: ``S / max(rows, cols)``.
    """

    size: int
    rows: int
    cols: int
    scale: float

    @classmethod
    def for_slice(cls, rows: int, cols: int, size: int) -> SamFrame:
        """The frame of a ``rows x cols`` slice in an ``size x size`` model input."""
        if rows < 1 or cols < 1 or size < 1:
            raise ModelInputError(f"slice of {rows} x {cols} pixels for a {size} x {size} model", expected="sizes >= 1")
        return cls(size=int(size), rows=int(rows), cols=int(cols), scale=size / max(rows, cols))

    @property
    def new_rows(self) -> int:
        """Rows of the resized slice inside the frame."""
        return min(self.size, int(self.rows * self.scale + 0.5))

    @property
    def new_cols(self) -> int:
        """Columns of the resized slice inside the frame."""
        return min(self.size, int(self.cols * self.scale + 0.5))

    def _xy_scale(self) -> tuple[float, float]:
        return self.new_cols / self.cols, self.new_rows / self.rows

    def points_to_model(self, coords: Tensor | Sequence[Sequence[float]]) -> Tensor:
        """Map slice pixel coordinates ``(N, 2)`` as ``(x=col, y=row)`` to the model frame ``(N, 2)`` float32."""
        c = torch.as_tensor(coords, dtype=torch.float32).reshape(-1, 2)
        sx, sy = self._xy_scale()
        s = torch.tensor([sx, sy], dtype=torch.float32)
        return (c + 0.5) * s - 0.5

    def box_to_model(self, box: Sequence[float] | Tensor) -> Tensor:
        """Map an inclusive slice box ``(x0, y0, x1, y1)`` to the model frame, ``(4,)`` float32."""
        b = torch.as_tensor(box, dtype=torch.float32).reshape(2, 2)
        return self.points_to_model(b).reshape(4)

    def logits_to_slice(self, logits: Tensor) -> Tensor:
        """Crop the valid region of model-frame maps ``(..., S, S)`` and resize (bilinear) to ``(..., rows, cols)``."""
        if tuple(logits.shape[-2:]) != (self.size, self.size):
            raise ModelInputError(
                f"model output has spatial shape {tuple(logits.shape[-2:])}",
                expected=f"({self.size}, {self.size}), the model's input size",
            )
        lead = logits.shape[:-2]
        valid = logits[..., : self.new_rows, : self.new_cols].reshape(-1, 1, self.new_rows, self.new_cols)
        out = F.interpolate(valid.float(), size=(self.rows, self.cols), mode="bilinear", align_corners=False)
        return out.reshape(*lead, self.rows, self.cols)


def prepare_slice(image: Tensor, size: int) -> tuple[Tensor, SamFrame]:
    """Resize (longest side to ``size``, bilinear with antialias), normalise and zero-pad one slice.

    Args:
        image: ``(3, rows, cols)`` in ``[0, 255]`` (see :func:`sam_intensity` and :func:`volume_slice`).
        size: side ``S`` of the model input.

    Returns:
        The model input ``(3, S, S)`` float32, normalised with SAM's pixel mean/std, and its :class:`SamFrame`.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ModelInputError(f"slice has shape {tuple(image.shape)}", expected="(3, rows, cols) in [0, 255]")
    frame = SamFrame.for_slice(int(image.shape[1]), int(image.shape[2]), size)
    x = torch.as_tensor(image).float()[None]
    if (frame.new_rows, frame.new_cols) != (frame.rows, frame.cols):
        x = F.interpolate(
            x, size=(frame.new_rows, frame.new_cols), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, size - frame.new_cols, 0, size - frame.new_rows))
    return x[0], frame


def prepare_mask(mask: Tensor, size: int) -> Tensor:
    """Bring a slice mask ``(rows, cols)`` into the model frame ``(S, S)`` (nearest neighbour, zero padding).

    The dtype of ``mask`` is kept.
    """
    if mask.ndim != 2:
        raise ModelInputError(f"mask has shape {tuple(mask.shape)}", expected="a 2-D mask (rows, cols)")
    frame = SamFrame.for_slice(int(mask.shape[0]), int(mask.shape[1]), size)
    m = torch.as_tensor(mask)
    resized = F.interpolate(m[None, None].float(), size=(frame.new_rows, frame.new_cols), mode="nearest-exact")
    out = F.pad(resized, (0, size - frame.new_cols, 0, size - frame.new_rows))[0, 0]
    return out.to(m.dtype)


#: How a model draws a box prompt from a label: ``"all_pixels"`` boxes every foreground pixel (DB-SAM / MedSAM:
#: ``bbox(mask > 0)``), ``"largest_component"`` only the largest 8-connected component (SAM-Med2D / SAM-UNet).
BOX_RULES = ("all_pixels", "largest_component")
DEFAULT_BOX_RULE = "largest_component"


def box_rule_of(model: object) -> str:
    """The box rule a prompted model declares as ``model.box_rule`` (:data:`DEFAULT_BOX_RULE` when it names none).

    Raises:
        ConfigError: the model names a rule outside :data:`BOX_RULES`.
    """
    rule = getattr(model, "box_rule", None) or DEFAULT_BOX_RULE
    _check_rule(rule)
    return str(rule)


def _check_rule(rule: str) -> None:
    if rule not in BOX_RULES:
        raise ConfigError(
            f"unknown box rule {rule!r}",
            expected=f"one of {BOX_RULES}",
            hint=did_you_mean(rule, list(BOX_RULES)) or None,
        )


def box_from_mask(mask: Tensor | np.ndarray, rule: str = DEFAULT_BOX_RULE) -> BoxInt | None:
    """Inclusive bounding box ``(x0, y0, x1, y1)`` (``x`` = column) of a slice mask ``(rows, cols)``.

    Args:
        mask: boolean (or 0/1) slice mask ``(rows, cols)``.
        rule: ``"largest_component"`` boxes only the largest 8-connected component (ties: the first in raster
            order), as SAM-Med2D / SAM-UNet do; ``"all_pixels"`` boxes every foreground pixel, as DB-SAM / MedSAM do.
            A model declares its own as ``box_rule`` (see :func:`box_rule_of`).

    Returns:
        The box, or ``None`` for an empty mask.

    Raises:
        ModelInputError: ``mask`` is not 2-D.
        ConfigError: unknown ``rule``.
    """
    _check_rule(rule)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask).astype(bool)
    if m.ndim != 2:
        raise ModelInputError(f"mask has shape {m.shape}", expected="a 2-D mask (rows, cols)")
    if not m.any():
        return None
    if rule == "largest_component":
        labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            m = labels == int(np.argmax(sizes)) + 1
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _clip_box(x0: int, y0: int, x1: int, y1: int, rows: int, cols: int) -> BoxInt:
    return (
        int(np.clip(x0, 0, cols - 1)),
        int(np.clip(y0, 0, rows - 1)),
        int(np.clip(x1, 0, cols - 1)),
        int(np.clip(y1, 0, rows - 1)),
    )


def enlarge_box(
    box: Sequence[int], rows: int, cols: int, rng: np.random.Generator, max_shift: int = 20, grid: int = 256
) -> BoxInt:
    """DB-SAM / MedSAM box jitter: each side moves outwards independently.

    Each side is enlarged by an integer drawn from ``U{0..max_shift-1}`` measured on a ``grid x grid`` resampling
    of the slice, i.e. by ``round(k * cols / grid)`` pixels in ``x`` and ``round(k * rows / grid)`` in ``y``; the
    result is clipped to the slice.

    Args:
        box: inclusive ``(x0, y0, x1, y1)``.
        rows: slice height.
        cols: slice width.
        rng: the random generator.
        max_shift: exclusive upper bound of the enlargement on the grid (DB-SAM: 20).
        grid: side of the grid the enlargement is measured on (DB-SAM: 256).
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    k = rng.integers(0, max(1, int(max_shift)), size=4)
    dx = np.rint(k[[0, 2]] * cols / grid).astype(int)
    dy = np.rint(k[[1, 3]] * rows / grid).astype(int)
    return _clip_box(x0 - dx[0], y0 - dy[0], x1 + dx[1], y1 + dy[1], rows, cols)


def shift_box(box: Sequence[int], rows: int, cols: int, rng: np.random.Generator) -> BoxInt:
    """SAM-Med2D / SAM-UNet box jitter: translate by one integer offset per axis, then clip.

    With ``w = x1 - x0`` and ``h = y1 - y0``, the offsets are drawn from ``[-m, m)`` with
    ``m = min(5, int(0.5 * min(w, h)))``; a box with ``m = 0`` is kept.

    Args:
        box: inclusive ``(x0, y0, x1, y1)``.
        rows: slice height.
        cols: slice width.
        rng: the random generator.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    m = min(5, int(0.5 * min(x1 - x0, y1 - y0)))
    dx, dy = (int(v) for v in rng.integers(-m, m, size=2)) if m > 0 else (0, 0)
    return _clip_box(x0 + dx, y0 + dy, x1 + dx, y1 + dy, rows, cols)


#: Training box jitter rules by name: ``rule(box, rows, cols, rng) -> box``.
BOX_JITTER: dict[str, Callable[..., BoxInt]] = {"enlarge": enlarge_box, "shift": shift_box}
