"""Self-configuring training: a plan derived from the dataset fingerprint for one model on one device.

The rules follow nnU-Net v2's ``ExperimentPlanner`` (``docs/planning.md``):

* **target spacing**: the median spacing; when the coarsest axis is more than 3× the others *and* has fewer than a
  third of their voxels, that axis takes the 10th percentile of its spacings instead (never finer than the others);
* **normalisation** from the channels' modality: CT → ``ct_fingerprint`` (clip to the foreground 0.5 / 99.5
  percentiles, z-score with the foreground mean / std, the numbers written into the plan); every other modality →
  per-image z-score, over the non-zero voxels (``mri``) when cropping to them removes more than a quarter of the
  image, else over all voxels (``zscore``);
* **patch size**: start from a 256³ (2D: 2048²) patch with the aspect ratio of the target spacing, cap it at the
  median shape at the target spacing, round each axis to the nearest multiple of the card's ``divisible_by`` (one
  axis at least twice it, so the bottleneck is not a single voxel; never below the card's ``min_size``), then shrink
  the axis that is largest relative to the median shape until a batch of 2 fits the memory budget;
* **batch size**: as many patches as fit, at least 2, at most enough to cover 5 % of the dataset's voxels;
* **memory**: measured, not guessed: a forward and backward pass of *this* model at two small patch sizes
  (:func:`probe_memory`; CUDA: the allocator's peak, CPU: the bytes autograd saves plus the input) fits
  ``bytes = fixed + per_voxel × batch × voxels``; weights, gradients and AdamW's two moments are added as 4× the
  parameter bytes;
* **sampling / augmentation**: nnU-Net's foreground oversampling of 1/3; spatial, flip and intensity augmentation,
  plus gamma for non-CT channels (what :func:`medseg.transforms.presets.augmentation` does per preset).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError
from medseg.data.fingerprint import DatasetFingerprint, median_shape_at_spacing
from medseg.models import create_model, get_card

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIGURATIONS",
    "PLANNED_KEYS",
    "PLAN_FILE",
    "Layout",
    "MemoryProbe",
    "Plan",
    "lowres_layout",
    "make_plan",
    "merge_plan",
    "normalisation",
    "probe_memory",
    "target_spacing",
]

PLAN_FILE = "plan.json"
ANISOTROPY_THRESHOLD = 3.0
FG_RATIO = 0.33  # nnU-Net's oversample_foreground_percent
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
CPU_RAM_SHARE = 0.25  # default CPU budget: this share of physical memory
CUDA_MEMORY_SHARE = 0.85  # default CUDA budget: this share of the device's memory
LOWRES_THRESHOLD = 0.25  # nnU-Net's lowres_creation_threshold: patch voxels / median image voxels
LOWRES_STEP = 1.03  # nnU-Net's spacing_increase_factor


def target_spacing(fingerprint: DatasetFingerprint) -> tuple[tuple[float, ...], bool]:
    """nnU-Net's ``determine_fullres_target_spacing`` on the fingerprint; returns ``(spacing, anisotropic)``."""
    spacings = fingerprint.spacings
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(fingerprint.shapes.astype(np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings, other_sizes = [target[i] for i in others], [target_size[i] for i in others]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(other_spacings)
    aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(other_sizes)
    anisotropic = bool(aniso_spacing and aniso_voxels)
    if anisotropic:
        coarse = float(np.percentile(spacings[:, worst], 10))
        if coarse < max(other_spacings):
            coarse = max(max(other_spacings), coarse) + 1e-5
        target[worst] = coarse
    return tuple(float(v) for v in target), anisotropic


def normalisation(fingerprint: DatasetFingerprint) -> tuple[str, tuple[dict[str, float], ...]]:
    """Preset and per-channel numbers from the channels' modality (nnU-Net's CT / z-score rule).

    Returns:
        ``("ct_fingerprint", ({"low", "high", "mean", "std"}, ...))`` when every channel is CT, else
        ``("mri", ())`` (z-score over non-zero voxels) or ``("zscore", ())`` (over all voxels).
    """
    channels = fingerprint.channels
    if channels and all(c.modality == "CT" for c in channels):
        if any(c.n_samples == 0 for c in channels):
            logger.warning("no foreground voxels to take CT statistics from: planning a z-score instead")
        else:
            stats = tuple(
                {"low": c.percentile_00_5, "high": c.percentile_99_5, "mean": c.mean, "std": max(c.std, 1e-8)}
                for c in channels
            )
            return "ct_fingerprint", stats
    elif any(c.modality == "CT" for c in channels):
        logger.warning("CT mixed with other channels: one z-score preset for all of them (per-channel presets: none)")
    return ("mri" if fingerprint.median_relative_size_after_crop < 0.75 else "zscore"), ()


@dataclass(frozen=True)
class MemoryProbe:
    """Measured training memory of a model: ``fixed + per_voxel × batch × voxels`` bytes.

    Attributes:
        fixed: bytes independent of the batch (weights, gradients, AdamW moments, allocator slack).
        per_voxel: bytes per input voxel of one sample (activations saved for backward, input, logits).
        device: where it was measured.
        params: number of trainable parameters.
    """

    fixed: float
    per_voxel: float
    device: str
    params: int

    def bytes(self, patch: Sequence[int], batch: int) -> float:
        """Predicted peak bytes of one training step with ``batch`` patches of ``patch`` voxels."""
        return self.fixed + self.per_voxel * batch * float(np.prod(patch))


def _step_bytes(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Peak bytes of one forward/backward step (CUDA: allocator peak; CPU: bytes autograd saved + input)."""
    saved: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            saved[id(t)] = t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    outs = out if isinstance(out, list | tuple) else [out]
    loss = sum(o.float().square().mean() for o in outs)
    logits_bytes = sum(o.numel() * o.element_size() for o in outs)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    else:
        peak = float(sum(saved.values()) + 2 * x.numel() * x.element_size() + 2 * logits_bytes)
    model.zero_grad(set_to_none=True)
    return peak


def probe_memory(
    model_name: str,
    in_channels: int,
    label_names: Sequence[str],
    *,
    device: str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
) -> MemoryProbe:
    """Measure the training memory of ``model_name`` by a forward/backward pass at two small patch sizes.

    Patches are ``divisible_by`` (at least 16) per axis with the last axis 2×, then 4×; batch 1. The difference
    gives the bytes per voxel, the rest is fixed; weights, gradients and AdamW's moments add 4× the parameter bytes.

    Raises:
        ConfigError: the model is unknown or needs prompts (no dense plan), or the device is not available.
    """
    card = get_card(model_name)
    if card.needs_prompts or card.task != "segmentation":
        raise ConfigError(
            f"model {model_name!r} is not a dense segmentation model",
            expected="a dense model (medseg models lists them)",
            hint="prompted models train on their own fixed input size; they need no plan",
        )
    dev = pick_device(device)
    low = card.min_size or (1,) * card.spatial_dims
    base = tuple(
        max(d, math.ceil(16 / d) * d, math.ceil(m / d) * d)
        for d, m in zip(card.divisible_by[: card.spatial_dims], low, strict=True)
    )
    small, large = (*base[:-1], base[-1] * 2), (*base[:-1], base[-1] * 4)  # one axis twice: no 1-voxel bottleneck
    measured = []
    params = 0
    for patch in (small, large):
        model = create_model(
            model_name, in_channels=in_channels, label_names=tuple(label_names), roi_size=patch, **(model_kwargs or {})
        ).to(dev)
        model.train()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        x = torch.randn(1, in_channels, *patch, device=dev)
        measured.append(_step_bytes(model, x, dev))
        del model, x
    per_voxel = max((measured[1] - measured[0]) / (float(np.prod(large)) - float(np.prod(small))), 1e-6)
    fixed = max(measured[0] - per_voxel * float(np.prod(small)), 0.0) + 4 * 4 * params
    return MemoryProbe(fixed=fixed, per_voxel=per_voxel, device=dev.type, params=params)


def default_budget_gib(device: str) -> float:
    """Memory budget when none is given: 85 % of the CUDA device, or a quarter of the machine's RAM on CPU."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return CUDA_MEMORY_SHARE * torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return CPU_RAM_SHARE * total / 2**30


@dataclass(frozen=True)
class Plan:
    """A training plan: what ``medseg plan`` prints and saves as ``plan.json``.

    Attributes:
        dataset, model, device: what was planned for.
        spatial_dims: 2 or 3 (the model's).
        modality: the dataset's declared modality; ``channel_modalities``: per channel.
        target_spacing: mm per axis (RAS order; a 2D plan keeps the slice axis as is).
        anisotropic: the coarse-axis rule fired.
        median_shape: median shape at the target spacing.
        patch_size, batch_size: the training patch (``model.roi_size``) and batch.
        preset: intensity preset; ``intensity``: per-channel numbers of ``ct_fingerprint``.
        fg_ratio: share of patches centred on foreground.
        augmentation: augmentation the preset applies.
        memory_budget_gib, estimated_gib: the budget and the predicted peak of one step.
        probe: the measured :class:`MemoryProbe` as a dict.
        fingerprint_digest: digest of the fingerprint the plan came from.
        configuration: ``3d_fullres``, ``3d_lowres`` or ``2d`` (nnU-Net's names).
        alternatives: the other configurations nnU-Net's rules create for this data (``3d_lowres`` when the
            full-resolution patch covers less than a quarter of the median image), as ``{name: {target_spacing,
            median_shape, patch_size, batch_size, estimated_gib}}``.
    """

    dataset: str
    model: str
    device: str
    spatial_dims: int
    modality: str
    channel_modalities: tuple[str, ...]
    target_spacing: tuple[float, ...]
    anisotropic: bool
    median_shape: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    preset: str
    intensity: tuple[dict[str, float], ...]
    fg_ratio: float
    augmentation: str
    memory_budget_gib: float
    estimated_gib: float
    probe: dict[str, Any] = field(default_factory=dict)
    fingerprint_digest: str = ""
    configuration: str = "3d_fullres"
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        for key in ("channel_modalities", "target_spacing", "median_shape", "patch_size", "intensity"):
            d[key] = tuple(d[key])
        return cls(**d)

    def config_changes(self) -> dict[str, dict[str, Any]]:
        """The plan as ``ExperimentConfig.updated`` changes (``data``, ``model.roi_size``, ``train``)."""
        return {
            "data": {
                "spacing": list(self.target_spacing),
                "preset": self.preset,
                "intensity": [dict(s) for s in self.intensity] or None,
            },
            "model": {"roi_size": list(self.patch_size)},
            "train": {"batch_size": self.batch_size, "fg_ratio": self.fg_ratio},
        }

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """``config`` with the plan's fields set."""
        return config.updated(self.config_changes())

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows of the printed table."""
        fmt = ", ".join
        rows = [
            ("dataset", f"{self.dataset} ({self.modality}; channels {fmt(self.channel_modalities)})"),
            ("model", f"{self.model} ({self.spatial_dims}D) on {self.device}"),
            ("configuration", self.configuration),
            (
                "target spacing (mm)",
                fmt(f"{s:.3g}" for s in self.target_spacing) + (" (anisotropic)" * self.anisotropic),
            ),
            ("median shape at target", fmt(f"{s:.0f}" for s in self.median_shape)),
            ("patch size", " x ".join(str(p) for p in self.patch_size)),
            ("batch size", str(self.batch_size)),
            ("normalisation", self.preset),
        ]
        for i, st in enumerate(self.intensity):
            rows.append(
                (
                    f"  channel {i}",
                    f"clip [{st['low']:.4g}, {st['high']:.4g}], mean {st['mean']:.4g}, std {st['std']:.4g}",
                )
            )
        rows += [
            ("foreground oversampling", f"{self.fg_ratio:.2f}"),
            ("augmentation", self.augmentation),
            ("memory (est. / budget)", f"{self.estimated_gib:.2f} / {self.memory_budget_gib:.2f} GiB"),
        ]
        for name, alt in self.alternatives.items():
            rows.append(
                (
                    f"also: {name}",
                    f"spacing {', '.join(f'{s:.3g}' for s in alt['target_spacing'])}; patch "
                    + " x ".join(str(p) for p in alt["patch_size"])
                    + f"; batch {alt['batch_size']} (--configuration {name})",
                )
            )
        return rows

    def table(self) -> str:
        """The plan as an aligned two-column text table."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _initial_patch(
    spacing: Sequence[float], median_shape: Sequence[float], divisible: Sequence[int], smallest: Sequence[int]
) -> list[int]:
    tmp = 1.0 / np.asarray(spacing, dtype=np.float64)
    volume = 256.0**3 if len(tmp) == 3 else 2048.0**2
    patch = np.round(tmp * (volume / np.prod(tmp)) ** (1.0 / len(tmp)))
    patch = np.minimum(patch, np.asarray(median_shape))
    out = [max(round(p / d) * d, s) for p, d, s in zip(patch, divisible, smallest, strict=True)]  # nearest multiple
    if all(p == d for p, d in zip(out, divisible, strict=True)):  # a 1-voxel bottleneck: InstanceNorm cannot train
        axis = int(np.argmax(np.asarray(median_shape) / np.asarray(divisible)))
        out[axis] *= 2
    return out


@dataclass(frozen=True)
class Layout:
    """One configuration's geometry: target spacing, the median shape at it, and the patch and batch that fit."""

    spacing: tuple[float, ...]
    median: tuple[float, ...]
    patch: tuple[int, ...]
    batch: int

    def summary(self, probe: MemoryProbe) -> dict[str, Any]:
        """JSON form, with the predicted memory of one step."""
        return {
            "target_spacing": list(self.spacing),
            "median_shape": list(self.median),
            "patch_size": list(self.patch),
            "batch_size": self.batch,
            "estimated_gib": probe.bytes(self.patch, self.batch) / 2**30,
        }


def _fit_layout(
    fingerprint: DatasetFingerprint,
    spacing: Sequence[float],
    model_name: str,
    probe: MemoryProbe,
    budget_gib: float,
    *,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> Layout:
    """Patch (shrunk until a batch of 2 fits) and batch (as many as fit, capped at 5 % of the data) at ``spacing``.

    A given ``patch_size`` or ``batch_size`` is kept as it is (a config file's choice); the other is fitted around it.
    """
    card = get_card(model_name)
    budget = budget_gib * 2**30
    median = median_shape_at_spacing(fingerprint, spacing)
    dims = card.spatial_dims
    plan_axes = list(range(dims)) if dims == 3 else [0, 1]  # a 2D model sees (X, Y) planes along Z
    divisible = [int(d) for d in card.divisible_by[:dims]]
    # the smallest patch per axis: one divisor, or the card's min_size rounded up to a multiple of it
    smallest = [max(d, math.ceil(m / d) * d) for d, m in zip(divisible, card.min_size or (1,) * dims, strict=True)]
    axis_median = [max(median[a], 1.0) for a in plan_axes]
    axis_spacing = [spacing[a] for a in plan_axes]
    if patch_size is not None:
        patch = [int(p) for p in patch_size]
    else:
        patch = _initial_patch(axis_spacing, axis_median, divisible, smallest)
        while probe.bytes(patch, MIN_BATCH) > budget:
            ratios = [p / m if p > s else -1.0 for p, m, s in zip(patch, axis_median, smallest, strict=True)]
            if sum(p > d for p, d in zip(patch, divisible, strict=True)) == 1:  # keep one axis at 2x its divisor
                ratios = [r if p > 2 * d else -1.0 for r, p, d in zip(ratios, patch, divisible, strict=True)]
            axis = int(np.argmax(ratios))
            if ratios[axis] < 0:
                raise ConfigError(
                    f"model {model_name!r} does not fit {budget_gib:.2f} GiB even with a {patch} patch "
                    f"(predicted {probe.bytes(patch, MIN_BATCH) / 2**30:.2f} GiB for a batch of {MIN_BATCH})",
                    expected=f"a memory budget above {probe.bytes(patch, MIN_BATCH) / 2**30:.2f} GiB",
                    hint="raise --memory-gib, choose a smaller model, or plan for another device",
                )
            patch[axis] -= divisible[axis]
    if batch_size is not None:
        batch = int(batch_size)
    else:
        voxels = float(np.prod(patch))
        fit = int((budget - probe.fixed) // (probe.per_voxel * voxels))
        dataset_voxels = float(np.prod(axis_median)) * len(fingerprint.cases)
        if dims == 2:
            dataset_voxels *= max(median[2], 1.0)
        cap = round(dataset_voxels * MAX_DATASET_COVERED / voxels)
        batch = max(min(fit, cap), MIN_BATCH)
    if probe.bytes(patch, batch) > budget:
        logger.warning(
            "patch %s with batch %d is predicted to need %.2f GiB, above the %.2f GiB budget",
            patch,
            batch,
            probe.bytes(patch, batch) / 2**30,
            budget_gib,
        )
    return Layout(tuple(float(s) for s in spacing), median, tuple(patch), batch)


def lowres_layout(
    fingerprint: DatasetFingerprint,
    fullres: Layout,
    model_name: str,
    probe: MemoryProbe,
    budget_gib: float,
) -> Layout | None:
    """nnU-Net's ``3d_lowres`` rule on top of the full-resolution layout, or ``None`` when it creates none.

    While the patch covers less than a quarter of the median image, the spacing grows by 3 % per step (first only
    the axes more than 2× finer than the coarsest, then all), and the patch is fitted again at each step. The
    configuration is dropped when the median image at the low-res spacing has not at least halved in voxels.
    """
    full_median = np.asarray(fullres.median, dtype=np.float64)
    spacing = np.asarray(fullres.spacing, dtype=np.float64)
    median_voxels = float(np.prod(full_median))
    patch_voxels = float(np.prod(fullres.patch))
    layout = None
    while patch_voxels / median_voxels < LOWRES_THRESHOLD:
        coarsest = spacing.max()
        fine = coarsest / spacing > 2
        if fine.any():
            spacing[fine] *= LOWRES_STEP
        else:
            spacing *= LOWRES_STEP
        median_voxels = float(np.prod(np.asarray(fullres.spacing) / spacing * full_median))
        layout = _fit_layout(fingerprint, tuple(spacing), model_name, probe, budget_gib)
        patch_voxels = float(np.prod(layout.patch))
    if layout is None or float(np.prod(full_median)) / median_voxels < 2:
        return None
    return layout


CONFIGURATIONS = ("auto", "3d_fullres", "3d_lowres", "2d")


def make_plan(
    fingerprint: DatasetFingerprint,
    model_name: str,
    *,
    device: str = "cpu",
    memory_gib: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    probe: MemoryProbe | None = None,
    configuration: str = "auto",
    spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> Plan:
    """Plan training of ``model_name`` on the fingerprinted dataset (see the module docstring for the rules).

    Args:
        fingerprint: :func:`medseg.data.fingerprint.load_or_compute_fingerprint` of the dataset.
        model_name: a registered dense model.
        device: ``cpu``, ``cuda`` or ``auto``: where the memory is probed and training will run.
        memory_gib: memory budget of one training step (default :func:`default_budget_gib`).
        model_kwargs: builder keyword arguments of the model (``model.kwargs``).
        probe: a measured probe to reuse (default: measured now).
        configuration: ``auto`` (``2d`` for 2D models, else ``3d_fullres``), ``3d_fullres``, ``3d_lowres`` (nnU-Net's
            low-resolution rule; refused when the data is small enough not to need one) or ``2d``.
        spacing, patch_size, batch_size: fixed by the caller (a config file): kept as they are, the rest planned
            around them.

    Raises:
        ConfigError: the model needs prompts, the device is unavailable, the configuration does not fit the model
            or the data, or even the smallest patch does not fit.
    """
    card = get_card(model_name)
    if configuration not in CONFIGURATIONS:
        raise ConfigError(f"unknown configuration {configuration!r}", expected=", ".join(CONFIGURATIONS))
    dims = card.spatial_dims
    if configuration == "auto":
        configuration = "2d" if dims == 2 else "3d_fullres"
    if (configuration == "2d") != (dims == 2):
        raise ConfigError(
            f"configuration {configuration!r} does not fit model {model_name!r}, which is {dims}D",
            expected="2d for 2D models, 3d_fullres or 3d_lowres for 3D models",
            hint="choose a 2D model (e.g. unet2d) for a 2d plan" if configuration == "2d" else "use --configuration 2d",
        )
    n_channels = len(fingerprint.channels)
    probe = probe or probe_memory(
        model_name, n_channels, fingerprint.label_names, device=device, model_kwargs=model_kwargs
    )
    budget_gib = memory_gib if memory_gib is not None else default_budget_gib(device)
    planned_spacing, anisotropic = target_spacing(fingerprint)
    fixed = {"patch_size": patch_size, "batch_size": batch_size}
    full = _fit_layout(fingerprint, spacing or planned_spacing, model_name, probe, budget_gib, **fixed)
    alternatives: dict[str, dict[str, Any]] = {}
    layout = full
    if dims == 3 and spacing is None:
        low = lowres_layout(fingerprint, full, model_name, probe, budget_gib)
        if configuration == "3d_lowres":
            if low is None:
                raise ConfigError(
                    f"no 3d_lowres configuration for {fingerprint.dataset}: the 3d_fullres patch {list(full.patch)} "
                    f"already covers a quarter of the median image {[round(m) for m in full.median]}",
                    expected="data whose median image is more than 4x the full-resolution patch",
                    hint="use --configuration 3d_fullres",
                )
            layout = _fit_layout(fingerprint, low.spacing, model_name, probe, budget_gib, **fixed)
            alternatives["3d_fullres"] = full.summary(probe)
        elif low is not None:
            alternatives["3d_lowres"] = low.summary(probe)
    elif configuration == "3d_lowres":
        raise ConfigError("--configuration 3d_lowres plans its own spacing; data.spacing is set", hint="unset it")
    if dims == 2 and anisotropic and int(np.argmax(planned_spacing)) != 2:
        logger.warning(
            "the coarse axis of %s is axis %d, but a 2D model sees (X, Y) planes along Z",
            fingerprint.dataset,
            int(np.argmax(planned_spacing)),
        )
    preset, stats = normalisation(fingerprint)
    gamma = preset != "ct_fingerprint"
    return Plan(
        dataset=fingerprint.dataset,
        model=model_name,
        device=probe.device,
        spatial_dims=dims,
        modality=fingerprint.modality,
        channel_modalities=tuple(c.modality for c in fingerprint.channels),
        target_spacing=layout.spacing,
        anisotropic=anisotropic,
        median_shape=layout.median,
        patch_size=layout.patch,
        batch_size=layout.batch,
        preset=preset,
        intensity=stats,
        fg_ratio=FG_RATIO,
        augmentation="affine (p 0.2), flips, intensity scale/shift/noise" + (", gamma" if gamma else ""),
        memory_budget_gib=float(budget_gib),
        estimated_gib=probe.bytes(layout.patch, layout.batch) / 2**30,
        probe=asdict(probe),
        fingerprint_digest=fingerprint.digest,
        configuration=configuration,
        alternatives=alternatives,
    )


#: Config keys a plan sets (:meth:`Plan.config_changes`).
PLANNED_KEYS = (
    "data.spacing",
    "data.preset",
    "data.intensity",
    "model.roi_size",
    "train.batch_size",
    "train.fg_ratio",
)


def merge_plan(
    plan: Plan, config: ExperimentConfig, given: Mapping[str, str]
) -> tuple[ExperimentConfig, dict[str, str]]:
    """``config`` with the plan's fields, except those a config file (or option) sets explicitly.

    Args:
        plan: the plan (made with the given spacing / patch / batch fixed, so the rest fits around them).
        config: the config from the file and the command line.
        given: ``{"section.key": source}`` of the settings stated explicitly (e.g. ``"--config run.yaml"``).

    Returns:
        The merged config and ``{"section.key": source}`` for every planned key (``"plan"`` or the given source).
        ``data.intensity`` follows the preset: the plan's CT numbers are kept when the given preset is the plan's
        ``ct_fingerprint``; with another given preset, the config's own (usually none) stay.
    """
    changes = plan.config_changes()
    sources: dict[str, str] = {}
    for key in PLANNED_KEYS:
        section, name = key.split(".")
        if key in given:
            changes[section].pop(name, None)
            sources[key] = given[key]
        else:
            sources[key] = "plan"
    if "data.preset" in given and "data.intensity" not in given:
        if not (config.data.preset == "ct_fingerprint" == plan.preset):
            changes["data"].pop("intensity", None)
            sources["data.intensity"] = given["data.preset"] + " (follows data.preset)"
    return config.updated(changes), sources


#: Presets that normalise as CT; refused on data declared as another modality unless forced.
CT_PRESETS = frozenset({"ct", "ct_fingerprint"})


def check_preset_modality(preset: str, modality: str, *, force: bool = False, source: str = "data.preset") -> None:
    """Refuse a CT preset on a dataset declared as another modality (MRI, PET, US) unless ``force``.

    Raises:
        ConfigError: naming the preset, where it came from, the declared modality and the fix.
    """
    if force or preset not in CT_PRESETS or modality in ("CT", "unknown"):
        return
    raise ConfigError(
        f"intensity preset {preset!r} ({source}) normalises as CT, but the dataset declares modality {modality!r}",
        expected="a preset that fits the data: mri or zscore for MRI and other non-CT data",
        hint="set data.preset: mri (or zscore), drop --config to let medseg plan it, or set data.force_preset: true "
        "if the data really is CT",
    )
