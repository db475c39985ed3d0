"""Streamed logits -> labels on the input's grid, chunk by chunk, without the whole probability volume.

The grid a network sees differs from the input's by what preprocessing does: axis permutation and flips (RAS
orientation), scaling (resampling to a target spacing), translation (cropping to the foreground box). All are
axis-aligned, so each output axis ``k`` reads one source axis ``m`` through ``u = scale * v + offset`` (``v`` an
output index, ``u`` a source index). :class:`GridMap` holds these maps; :class:`LabelSink` consumes the engine's chunks
(:func:`medseg.inference.engine.stream_logits`), interpolates logits separably (linear, or nearest where the grids
coincide up to a permutation/flip/shift: then the labels are copied exactly), takes the argmax and writes labels
(uint8/uint16) into the output array. Output voxels outside the source region are background.

:class:`ProbabilityFiles` takes the per-class probabilities the sink computes, a few output planes at a time, and
writes them straight into memory-mapped files (one per class: an uncompressed uint8 ``.nii`` or a float16 ``.npy``),
so probabilities on the input's grid reach the disk without ``C_out x volume`` ever being held in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medseg.core.errors import ConfigError, ModelInputError
from medseg.inference.engine import trim_heap

__all__ = ["AxisMap", "GridMap", "LabelSink", "ProbabilityFiles", "ProbabilityOutput"]

_TOL = 1e-4


@dataclass(frozen=True)
class AxisMap:
    """How output axis ``k`` reads the source grid.

    Attributes:
        source_axis: the source spatial axis (0-based) feeding this output axis.
        scale, offset: source index ``u = scale * v + offset`` of output index ``v``.
        mode: ``linear`` or ``nearest`` interpolation along this axis.
        valid: output index range ``[lo, hi)`` that takes values from the source; outside it is background.
    """

    source_axis: int
    scale: float
    offset: float
    mode: Literal["linear", "nearest"]
    valid: tuple[int, int]

    def positions(self, source_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(v, lo, w)`` for every valid output index: source planes ``lo`` and ``lo + 1`` blended by ``w``."""
        v = torch.arange(self.valid[0], self.valid[1], dtype=torch.float64)
        u = (self.scale * v + self.offset).clamp(0, source_size - 1)
        if self.mode == "nearest":
            lo = torch.floor(u + 0.5).long().clamp(0, source_size - 1)
            return v.long(), lo, torch.zeros_like(u, dtype=torch.float32)
        lo = torch.floor(u).long().clamp(0, max(source_size - 2, 0))
        w = (u - lo.double()).clamp(0, 1).float()
        if source_size == 1:
            w = torch.zeros_like(w)
        return v.long(), lo, w


@dataclass(frozen=True)
class GridMap:
    """Axis-aligned map from a source grid (the network's) to an output grid (the input's).

    Attributes:
        axes: one :class:`AxisMap` per output spatial axis.
        source_shape: spatial shape of the source grid.
        output_shape: spatial shape of the output grid.
    """

    axes: tuple[AxisMap, ...]
    source_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def exact(self) -> bool:
        """Whether every axis copies source values (nearest); the labels then equal the source argmax exactly."""
        return all(a.mode == "nearest" for a in self.axes)

    @classmethod
    def from_affines(
        cls,
        source_affine: np.ndarray | torch.Tensor,
        source_shape: Sequence[int],
        output_affine: np.ndarray | torch.Tensor,
        output_shape: Sequence[int],
    ) -> GridMap:
        """The map between two voxel grids given their affines (index -> world, ``(D+1, D+1)``).

        Output voxels whose centre lies more than half a voxel outside the source grid are background.

        Raises:
            ModelInputError: the grids are rotated with respect to each other (not axis-aligned).
        """
        src = np.asarray(source_affine, dtype=np.float64)
        dst = np.asarray(output_affine, dtype=np.float64)
        t = np.linalg.inv(src) @ dst
        dims = len(output_shape)
        linear = t[:dims, :dims]
        axes = []
        used: set[int] = set()
        for k in range(dims):
            column = np.abs(linear[:, k])
            m = int(np.argmax(column))
            if m in used or column[m] == 0 or np.delete(column, m).max(initial=0.0) > _TOL * column[m]:
                raise ModelInputError(
                    "the network's grid is rotated with respect to the input's (not a permutation, flip, scale "
                    "or shift)",
                    hint="this happens only with hand-built affines; resample the input to an axis-aligned grid",
                )
            used.add(m)
            scale, offset = float(linear[m, k]), float(t[m, dims])
            size = int(source_shape[m])
            coincide = abs(abs(scale) - 1) < _TOL and abs(offset - round(offset)) < _TOL
            # Valid output indices: the source coordinate within half a voxel of the source grid.
            bounds = sorted(((-0.5 - offset) / scale, (size - 0.5 - offset) / scale))
            lo = max(0, math.ceil(bounds[0] - _TOL))
            hi = min(int(output_shape[k]), math.floor(bounds[1] + _TOL) + 1)
            if coincide:
                scale, offset = float(round(scale)), float(round(offset))
                lo, hi = _exact_range(scale, offset, size, int(output_shape[k]))
            axes.append(AxisMap(m, scale, offset, "nearest" if coincide else "linear", (lo, max(lo, hi))))
        return cls(tuple(axes), tuple(int(s) for s in source_shape), tuple(int(s) for s in output_shape))

    @classmethod
    def resize(
        cls,
        source_shape: Sequence[int],
        output_shape: Sequence[int],
        *,
        offset: Sequence[int] | None = None,
        full_shape: Sequence[int] | None = None,
        nearest_axes: Sequence[int] = (),
    ) -> GridMap:
        """Resize ``source_shape`` to ``output_shape`` (pixel centres aligned, edges clamped, as scikit-image's
        ``resize`` does), placed at ``offset`` inside an output of ``full_shape`` (background elsewhere).

        ``nearest_axes``: output axes resized by nearest neighbour (nnU-Net's separate-z rule for anisotropic data).
        """
        full = tuple(int(s) for s in (full_shape or output_shape))
        start = tuple(int(o) for o in (offset or (0,) * len(output_shape)))
        axes = []
        for k, (s, o) in enumerate(zip(source_shape, output_shape, strict=True)):
            ratio = s / o
            # u = (v - start + 0.5) * ratio - 0.5
            same = s == o
            mode: Literal["linear", "nearest"] = "nearest" if same or k in nearest_axes else "linear"
            axes.append(AxisMap(k, ratio, (0.5 - start[k]) * ratio - 0.5, mode, (start[k], start[k] + int(o))))
        return cls(tuple(axes), tuple(int(s) for s in source_shape), full)


def _exact_range(scale: float, offset: float, size: int, out_size: int) -> tuple[int, int]:
    # u = scale * v + offset in [0, size - 1], scale = +-1
    a, b = (0 - offset) / scale, (size - 1 - offset) / scale
    lo, hi = int(round(min(a, b))), int(round(max(a, b)))
    return max(0, lo), min(out_size, hi + 1)


class LabelSink:
    """Collects the engine's logits chunks and writes labels (and optionally probabilities) on the output grid.

    Args:
        grid: the source -> output map.
        channels: ``C_out`` of the logits.
        keep_probabilities: also keep softmax probabilities ``(C_out, *output_shape)`` (float16 unless
            ``probability_dtype`` says otherwise); background voxels get probability 1 for class 0.
        probability_dtype: dtype of the kept probabilities.
        planes_per_step: output planes computed at once (bounds the temporary ``C_out x planes x plane`` array);
            default: as many as keep that float32 array near 256 MiB.
        probability_files: write the probabilities into these files as each step is finished (instead of, or as
            well as, keeping them); their ``grid_shape`` must be the output grid's.
    """

    def __init__(
        self,
        grid: GridMap,
        channels: int,
        *,
        keep_probabilities: bool = False,
        probability_dtype: torch.dtype = torch.float16,
        planes_per_step: int | None = None,
        probability_files: ProbabilityFiles | None = None,
    ) -> None:
        self.grid = grid
        self.channels = channels
        self.probability_files = probability_files
        if probability_files is not None and (
            probability_files.grid_shape != grid.output_shape or probability_files.channels != channels
        ):
            raise ValueError(
                f"probability files of {probability_files.channels} x {probability_files.grid_shape} do not fit "
                f"{channels} x {grid.output_shape}"
            )
        dtype = np.uint8 if channels <= 256 else np.uint16
        self.labels = np.zeros(grid.output_shape, dtype=dtype)
        self.probabilities: torch.Tensor | None = None
        if keep_probabilities:
            self.probabilities = torch.zeros((channels, *grid.output_shape), dtype=probability_dtype)
            self.probabilities[0] = 1
        self.planes_per_step = planes_per_step
        self._positions = [a.positions(grid.source_shape[a.source_axis]) for a in grid.axes]
        self._by_source = {a.source_axis: k for k, a in enumerate(grid.axes)}
        self._previous: tuple[int, torch.Tensor] | None = None  # last plane of the previous chunk
        self._done = 0  # output planes (in consumption order) already written
        self._order: torch.Tensor | None = None
        self._axis: int | None = None

    def _plan(self, axis: int) -> None:
        k = self._by_source[axis]
        v, lo, w = self._positions[k]
        order = torch.argsort(lo, stable=True)
        self._order, self._axis = order, axis
        if self.planes_per_step is None:  # float32 temporaries of about 256 MiB
            plane = max(1, math.prod(self.grid.output_shape) // max(1, self.grid.output_shape[k]))
            self.planes_per_step = max(1, min(64, (256 * 2**20) // (4 * self.channels * plane)))

    def consume(self, axis: int, start: int, logits: torch.Tensor) -> None:
        """Take source planes ``start .. start + n - 1`` along source ``axis`` (``logits (C_out, ...)``)."""
        if self._axis is None:
            self._plan(axis)
        assert self._order is not None and axis == self._axis
        k = self._by_source[axis]
        v, lo, w = self._positions[k]
        end = start + logits.shape[axis + 1]
        base = start
        block = logits
        if self._previous is not None and self._previous[0] == start - 1:
            block = torch.cat([self._previous[1], logits], dim=axis + 1)
            base = start - 1
        order = self._order
        ready = self._done
        while ready < order.numel():
            i = int(order[ready])
            need = int(lo[i]) + (1 if float(w[i]) > 0 else 0)
            if need >= end:
                break
            ready += 1
        step = max(1, int(self.planes_per_step or 1))
        for s in range(self._done, ready, step):
            idx = order[s : min(ready, s + step)]
            self._write(k, axis, v[idx], lo[idx] - base, w[idx], block)
        self._done = ready
        self._previous = (end - 1, logits.narrow(axis + 1, logits.shape[axis + 1] - 1, 1).clone())
        del block, logits
        trim_heap()  # the step's temporaries are freed: keep the resident size at one step's

    def _write(
        self, k: int, axis: int, v: torch.Tensor, lo: torch.Tensor, w: torch.Tensor, block: torch.Tensor
    ) -> None:
        dims = block.ndim - 1
        values = _gather(block, axis + 1, lo, w)
        for kk, amap in enumerate(self.grid.axes):
            if kk == k:
                continue
            _, lo2, w2 = self._positions[kk]
            values = _gather(values, amap.source_axis + 1, lo2, w2)
        # Dims are in source-axis order; put them in output-axis order.
        perm = [0] + [self.grid.axes[kk].source_axis + 1 for kk in range(dims)]
        values = values.permute(*perm)
        labels = values.argmax(0).to(torch.int32).numpy()
        index: list[slice | np.ndarray] = [slice(a.valid[0], a.valid[1]) for a in self.grid.axes]
        index[k] = v.numpy()
        self.labels[tuple(index)] = labels.astype(self.labels.dtype, copy=False)
        if self.probabilities is not None or self.probability_files is not None:
            probs = torch.softmax(values, dim=0)
            if self.probability_files is not None:
                self.probability_files.write(tuple(index), probs)
            if self.probabilities is not None:
                full: list[slice | torch.Tensor] = [
                    slice(None),
                    *(slice(a.valid[0], a.valid[1]) for a in self.grid.axes),
                ]
                full[k + 1] = v
                self.probabilities[tuple(full)] = probs.to(self.probabilities.dtype)

    def finish(self) -> np.ndarray:
        """The labels (uint8 or uint16) on the output grid; every valid output plane must have been written."""
        total = self._order.numel() if self._order is not None else 0
        if self._done != total:
            raise RuntimeError(f"only {self._done} of {total} output planes were written")
        return self.labels


@dataclass(frozen=True)
class ProbabilityOutput:
    """Where per-class probabilities go on disk, and in which type (``infer.save_probabilities``).

    Attributes:
        prefix: files are ``<prefix>_<class>.nii`` (uint8) or ``<prefix>_<class>.npy`` (float16), plus
            ``<prefix>.json`` describing them.
        dtype: ``uint8`` (``round(p * 255)``; the NIfTI header's slope ``1/255`` gives ``p`` back) or ``float16``
            (as computed; NIfTI has no float16 type, so a Fortran-ordered ``.npy`` with the affine in the JSON).
    """

    prefix: Path
    dtype: Literal["uint8", "float16"]

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "float16"):
            raise ConfigError(f"probabilities cannot be saved as {self.dtype!r}", expected="uint8 or float16 (or none)")


class ProbabilityFiles:
    """Per-class probability files on the output grid, filled through memory maps as the sink computes them.

    Each file is created at full size first (class 0 = 1 and the others 0: the background outside the network's
    grid); each :meth:`write` then stores a few output planes and releases the mapped pages again (flushed to disk,
    dropped from the process's resident memory), so the resident memory stays at the size of one step whatever the
    class count and volume.

    Args:
        output: prefix and dtype.
        shape: spatial shape of the output grid ``(X, Y, Z)``.
        affine: the output grid's affine ``(4, 4)`` (index -> RAS world, mm), written into every file.
        label_names: one name per class (used in the file names).
        view: where the writer's grid is the files' grid with its axes permuted or flipped (nnU-Net's array order),
            a function returning each file's ``(X, Y, Z)`` array as a numpy *view* in the writer's order
            (transposes and reversed slices only); :meth:`write` indices are then in that order, and
            ``grid_shape`` is the viewed shape.
    """

    def __init__(
        self,
        output: ProbabilityOutput,
        shape: Sequence[int],
        affine: np.ndarray | torch.Tensor,
        label_names: Sequence[str],
        view: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.output = output
        self.shape = tuple(int(s) for s in shape)
        self.channels = len(label_names)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.dtype = np.dtype(np.uint8 if output.dtype == "uint8" else "<f2")
        suffix = ".nii" if output.dtype == "uint8" else ".npy"
        prefix = Path(output.prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.paths = [prefix.with_name(f"{prefix.name}_{_file_label(i, n)}{suffix}") for i, n in enumerate(label_names)]
        self.label_names = tuple(label_names)
        self._maps: list[mmap.mmap] = []
        self._arrays: list[np.ndarray] = []
        for path in self.paths:
            offset = self._create(path)
            with open(path, "r+b") as fh:
                mapped = mmap.mmap(fh.fileno(), 0)
            self._maps.append(mapped)
            self._arrays.append(np.ndarray(self.shape, dtype=self.dtype, buffer=mapped, offset=offset, order="F"))
        background = self._arrays[0]
        step = max(1, (64 * 2**20) // max(1, math.prod(self.shape[:-1]) * self.dtype.itemsize))
        for z in range(0, self.shape[-1], step):  # Fortran order: the last axis is the slowest, so contiguous
            background[..., z : z + step] = self._quantise(np.ones(()))
            self._release(0)
        if view is not None:
            viewed = [view(a) for a in self._arrays]
            if any(not np.shares_memory(v, a) for v, a in zip(viewed, self._arrays, strict=True)):
                raise ValueError("the probability files' view must be a view of each file's array, not a copy")
            self._arrays = viewed
        self.grid_shape = tuple(int(n) for n in self._arrays[0].shape) if self._arrays else self.shape

    def _create(self, path: Path) -> int:
        """Write the header and size the file; returns the offset of the data."""
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        with open(path, "wb") as fh:
            if self.output.dtype == "uint8":
                import nibabel as nib

                header = nib.Nifti1Header()
                header.set_data_shape(self.shape)
                header.set_data_dtype(np.uint8)
                header.set_qform(self.affine, code=1)
                header.set_sform(self.affine, code=1)
                header.set_slope_inter(1.0 / 255.0, 0.0)
                header.set_xyzt_units("mm")
                header["vox_offset"] = 352
                header.write_to(fh)
                fh.write(b"\x00" * (352 - fh.tell()))  # no extensions
            else:
                descr = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": True, "shape": self.shape}
                np.lib.format.write_array_header_1_0(fh, descr)
            offset = fh.tell()
            fh.truncate(offset + nbytes)
        return offset

    def _quantise(self, p: np.ndarray) -> np.ndarray:
        if self.output.dtype == "uint8":
            return np.rint(np.asarray(p, dtype=np.float32) * 255.0).astype(np.uint8)
        return np.asarray(p, dtype=np.float16)

    def _release(self, c: int) -> None:
        self._maps[c].flush()
        self._maps[c].madvise(mmap.MADV_DONTNEED)

    def write(self, index: tuple[slice | np.ndarray, ...], probabilities: torch.Tensor) -> None:
        """Store ``probabilities (C_out, ...)`` at ``index`` of the output grid (slices and one index array)."""
        values = probabilities.detach().float().numpy()
        for c, array in enumerate(self._arrays):
            array[index] = self._quantise(values[c])
            self._release(c)

    def close(self) -> dict[str, Path]:
        """Unmap the files, write ``<prefix>.json`` and return ``{class name: file}``."""
        self._arrays.clear()
        for mapped in self._maps:
            mapped.flush()
            mapped.close()
        self._maps.clear()
        files = dict(zip(self.label_names, self.paths, strict=True))
        meta = {
            "dtype": self.output.dtype,
            "scale": 1.0 / 255.0 if self.output.dtype == "uint8" else 1.0,
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "files": {name: path.name for name, path in files.items()},
        }
        prefix = Path(self.output.prefix)
        prefix.with_name(f"{prefix.name}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return files


def _file_label(index: int, name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-")
    return f"{index}-{clean}" if clean else str(index)


def _gather(x: torch.Tensor, dim: int, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at ``lo + w`` (``w == 0``: a plain copy of plane ``lo``)."""
    a = x.index_select(dim, lo)
    if not bool((w > 0).any()):
        return a
    hi = (lo + 1).clamp(max=x.shape[dim] - 1)
    b = x.index_select(dim, hi)
    shape = [1] * x.ndim
    shape[dim] = -1
    wv = w.reshape(shape).to(a.dtype)
    return a + (b - a) * wv
