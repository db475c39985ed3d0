"""Pydantic schemas of medseg's YAML configs.

An experiment config has four sections (``data``, ``model``, ``train``, ``infer``) plus a run ``name``. Every
section forbids unknown keys, so a typo is an error rather than a silently ignored setting. A run saves its
resolved config as ``config.yaml`` so that ``medseg.open_predictor`` can rebuild everything from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.core.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChannelIntensity(_Section):
    """Foreground intensity numbers of one channel for the ``ct_fingerprint`` preset (from a dataset fingerprint).

    Attributes:
        low, high: clip window (nnU-Net: the foreground 0.5 and 99.5 percentiles).
        mean, std: foreground mean and standard deviation the clipped values are z-scored with.
    """

    low: float
    high: float
    mean: float
    std: float = Field(gt=0)

    @model_validator(mode="after")
    def _increasing(self) -> ChannelIntensity:
        if not self.low <= self.high:
            raise ValueError(f"intensity window low {self.low} is above high {self.high}")
        return self


class DataConfig(_Section):
    """Dataset and preprocessing.

    Attributes:
        root: dataset folder (MSD, nnU-Net raw or paired layout); ``None`` when given on the command line.
        preset: intensity preset (``ct``, ``mri``, ``zscore`` = nnU-Net's all-voxel z-score, ``ct_fingerprint`` =
            nnU-Net's CT scheme with the numbers of ``intensity``, ``us``, ``rgb_mean05_std05`` = 8-bit RGB to
            [-1, 1] for 2D classifiers); ``None`` takes the model card's.
        spacing: target voxel spacing in mm; ``None`` keeps each image's own spacing.
        ct_window: HU window ``[low, high]`` clipped and scaled to [0, 1] by the CT preset.
        val_fraction: share of training cases held out for validation.
        crop_foreground: crop images to the non-zero box before patch sampling (MRI skull-stripped data).
        intensity: one :class:`ChannelIntensity` per input channel, read by the ``ct_fingerprint`` preset only
            (``medseg plan`` fills it from the dataset's foreground statistics).
        force_preset: accept a ``preset`` that contradicts the dataset's declared modality (e.g. ``ct`` on MRI).
    """

    root: Path | None = None
    preset: Literal["ct", "mri", "zscore", "ct_fingerprint", "us", "rgb_mean05_std05"] | None = None
    spacing: tuple[float, float, float] | None = None
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    crop_foreground: bool = False
    intensity: tuple[ChannelIntensity, ...] = ()
    force_preset: bool = False

    @model_validator(mode="after")
    def _intensity_for_preset(self) -> DataConfig:
        if self.preset == "ct_fingerprint" and not self.intensity:
            raise ValueError("preset ct_fingerprint needs data.intensity (low, high, mean, std per channel)")
        if self.intensity and self.preset != "ct_fingerprint":
            raise ValueError(f"data.intensity is read by the ct_fingerprint preset only, the preset is {self.preset!r}")
        return self

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive on every axis, got {v}")
        return v


class ModelConfig(_Section):
    """Network choice: a registry name and builder keyword arguments (``kwargs``).

    Attributes:
        name: registry name (``medseg models`` lists them).
        roi_size: training patch / sliding-window size; ``None`` takes the card's.
        kwargs: builder keyword arguments.
        pretrained: local weights files the model's own loader maps onto the network before training, in order
            (e.g. the official SAM ViT-B checkpoint ``sam_vit_b_01ec64.pth`` for ``db_sam`` / ``sam_unet_*``, plus an
            ImageNet ResNet file for ``sam_unet_*``). A single path is accepted.
        pretrained_sha256: optional SHA-256 digests, one per ``pretrained`` file, checked before loading.
    """

    name: str = "segformer3d"
    roi_size: tuple[int, ...] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: tuple[Path, ...] = ()
    pretrained_sha256: tuple[str, ...] = ()

    @field_validator("pretrained", "pretrained_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None:
            return ()
        return (v,) if isinstance(v, str | Path) else v

    @model_validator(mode="after")
    def _one_digest_per_file(self) -> ModelConfig:
        if self.pretrained_sha256 and len(self.pretrained_sha256) != len(self.pretrained):
            raise ValueError(
                f"pretrained_sha256 has {len(self.pretrained_sha256)} digests for "
                f"{len(self.pretrained)} pretrained files"
            )
        return self


class TrainConfig(_Section):
    """Optimisation.

    Attributes:
        epochs: number of epochs; an epoch is ``iters_per_epoch`` optimiser steps.
        iters_per_epoch: optimiser steps per epoch (nnU-Net uses 250).
        batch_size: patches per step.
        lr: AdamW peak learning rate, reached after ``warmup_iters`` linear warm-up steps, then decayed by
            ``schedule`` to ``lr * min_lr_ratio`` at the last step.
        schedule: decay after the warm-up: ``cosine`` (half a cosine period) or ``poly`` (polynomial,
            ``(1 - progress) ** poly_exponent``, nnU-Net's PolyLR); ``None`` takes the model's own paper schedule
            (``paper_schedule``; ``cosine`` for models that name none). Use ``min_lr_ratio: 0`` for the papers' poly.
        poly_exponent: exponent of the ``poly`` schedule (0.9 in nnU-Net and most papers); refused with ``cosine``.
        fg_ratio: share of patches centred on foreground (nnU-Net oversamples 1/3). Dense 3D models only.
        seed: seed of the run: weights, data split, and every epoch's data order, augmentation and dropout masks
            (each derived from ``(seed, epoch)``, so a resumed run draws what an uninterrupted one did).
        val_every: validate every this many epochs (and after the last).
        amp: mixed precision on CUDA (ignored on CPU, where bf16 is slow on many machines).
        loss: a name from the loss registry (``dice_ce``, ``mpunet_hybrid``, ``sam_dice_ce``, ``sam_focal_dice``);
            ``None`` takes the model's own paper loss (``dice_ce`` for models that name none). Lists of outputs
            (deep supervision) get nnU-Net's halving weights unless the loss weights them itself.
        max_val_slices: prompted 2D models validate on at most this many (slice, label) prompts. Prompted
            models only.
        num_workers: data-loading worker processes (0: in the training process). Changes the augmentation draws.
        label_smoothing: cross-entropy label smoothing of classification models (0: none). Classification only.

    Keys a model family does not use (e.g. ``fg_ratio`` for the prompted models, see
    :meth:`medseg.training.trainer.Trainer.check_config`) must stay at their defaults.
    """

    epochs: int = Field(50, ge=1)
    iters_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_iters: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    fg_ratio: float = Field(0.5, ge=0, le=1)
    grad_clip: float | None = 12.0
    seed: int = Field(0, ge=0)
    val_every: int = Field(5, ge=1)
    num_workers: int = Field(0, ge=0)
    amp: bool = True
    loss: str | None = None
    schedule: Literal["cosine", "poly"] | None = None
    poly_exponent: float = Field(0.9, gt=0)
    max_val_slices: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class InferConfig(_Section):
    """Sliding-window inference of dense models (validation during training, and prediction from the run).

    Attributes:
        overlap: fraction of a window shared with its neighbour (nnU-Net's step 0.5 = overlap 0.5).
        sw_batch_size: windows per network pass.
        blend: ``gaussian`` (nnU-Net's importance map) or ``constant``.
        tta: mirror test-time augmentation: average the passes flipped over every subset of ``tta_axes``.
        tta_axes: spatial axes (0-based, of the network's RAS grid) mirrored by ``tta``, every subset of them one
            pass; ``None``: all (2^3 = 8 passes in 3D, as nnU-Net). Default ``[0]`` (left-right, 2 passes): on the
            demo task it keeps mean Dice within 0.003 of all 8 passes (``benchmarks/results/tta-cpu.md``).
        crop_foreground: run windows only over the box of foreground voxels (values above ``foreground_floor``,
            or non-zero) and label everything outside it background, as nnU-Net does.
        foreground_floor: intensity (in the input's units) above which a voxel is foreground for the box;
            ``None``: the preset's default (-500 HU for CT presets, i.e. the body; non-zero for the others).
        precision: ``auto`` (float32 on CPU, float16 AMP on CUDA), ``fp32``, ``bf16`` (CPUs with native bf16 only)
            or ``fp16`` (CUDA only).
        backend: ``torch`` or ``openvino`` (CPU; the optional extra ``openvino``).
        accumulate: dtype of the sliding-window slab buffer.
        save_probabilities: also write per-class probabilities on the input's grid next to each mask, slab by slab
            (``uint8`` = ``round(p * 255)`` in a ``.nii`` per class, ``float16`` in a ``.npy`` per class; ``none``:
            masks only). ``medseg predict --save-probabilities`` overrides it.
    """

    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    tta_axes: tuple[int, ...] | None = (0,)
    crop_foreground: bool = True
    foreground_floor: float | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    backend: Literal["torch", "openvino"] = "torch"
    accumulate: Literal["float16", "float32"] = "float16"
    save_probabilities: Literal["none", "uint8", "float16"] = "none"


class ExperimentConfig(_Section):
    """A whole experiment: what ``medseg train --config`` reads and what a run saves as ``config.yaml``."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)

    def updated(self, changes: dict[str, dict[str, Any] | Any]) -> ExperimentConfig:
        """Return a validated copy with ``{"section": {"key": value}}`` changes applied (``None`` values skipped)."""
        data = self.model_dump()
        for section, value in changes.items():
            if isinstance(value, dict):
                data[section].update({k: v for k, v in value.items() if v is not None})
            elif value is not None:
                data[section] = value
        return validate_config(data, source="command-line options")

    def flat(self) -> dict[str, Any]:
        """Every setting as ``{"section.key": value}`` (JSON types: tuples as lists, paths as strings; ``name``)."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump(mode="json").items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    def non_defaults(self, keys: Iterable[str]) -> dict[str, tuple[Any, Any]]:
        """``{"section.key": (value, default)}`` for those of ``keys`` whose value differs from the schema default."""
        mine, defaults = self.flat(), ExperimentConfig().flat()
        return {k: (mine[k], defaults[k]) for k in keys if mine[k] != defaults[k]}

    def to_yaml(self) -> str:
        """YAML text of the resolved config (paths as strings, tuples as lists)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a config dictionary, turning pydantic's report into one ``ConfigError`` line."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(
            f"{source} is invalid: {problems}",
            hint="see configs/*.yaml for the accepted keys (sections: name, data, model, train, infer)",
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping", expected="keys name/data/model/train/infer")
    return data


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    return validate_config(_read_yaml(path), source=f"config file {path}")


def config_file_keys(path: str | Path) -> frozenset[str]:
    """The settings a YAML file states explicitly, as ``"section.key"`` (``null`` counts: it states "none").

    Defaults the file leaves out are not listed, so a plan can fill them (``medseg train --config``).
    """
    path = Path(path)
    data = _read_yaml(path)
    validate_config(data, source=f"config file {path}")
    keys: set[str] = set()
    for section, value in data.items():
        if isinstance(value, dict):
            keys.update(f"{section}.{k}" for k in value)
        else:
            keys.add(str(section))
    return frozenset(keys)
