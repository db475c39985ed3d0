"""MONAI dictionary-transform presets per modality.

Orientation (RAS) and resampling to the target spacing happen once, in :func:`preprocessing`, which both the
trainer and the predictor use; the predictor maps its output back to the input grid by affine (see
:mod:`medseg.inference.predictor`). Intensity presets:

* ``ct``: clip to a HU window and scale it to [0, 1] (nnU-Net clips to percentiles of the foreground; a fixed
  window is simpler to reason about and is what radiologists set).
* ``mri``: z-score over the non-zero voxels of each channel (nnU-Net's MRI normalisation).
* ``zscore``: nnU-Net v2's ``ZScoreNormalization`` without a mask, the "nonCT" scheme the released STU-Net weights
  were trained with: per channel over **all** voxels, ``(x - mean) / max(std, 1e-8)`` (population std). MONAI's
  ``NormalizeIntensity`` differs in the guard (it divides by 1 only when std is exactly 0), so this one transform
  is medseg's own (:class:`ZScoreNormalized`).
* ``ct_fingerprint``: nnU-Net v2's ``CTNormalization`` with the dataset's numbers, not the image's: per channel, clip
  to the foreground 0.5 / 99.5 percentiles and z-score with the foreground mean and std, all taken from
  ``data.intensity`` (``medseg plan`` writes them from the dataset fingerprint, see ``docs/planning.md``), so the
  predictor applies exactly what training did (:class:`FingerprintCTNormalized`).
* ``us``: ultrasound pixels are display-ready (log-compressed, gain applied), so no window: per channel, the 1st and
  99th percentiles are mapped to 0 and 1 and the rest clipped (MONAI ``ScaleIntensityRangePercentiles``).
* ``rgb_mean05_std05``: 8-bit RGB photographs (MedViTV2, MedMNIST): ``[0, 255]`` clipped and mapped to ``[-1, 1]``,
  i.e. scaling to [0, 1] then ``(x - 0.5) / 0.5`` per channel. For channel-first ``(3, H, W)`` 2D images, which are
  neither reoriented nor resampled: the classification transforms (:mod:`medseg.data.classification`) use it
  through :func:`intensity`, never :func:`preprocessing`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from medseg.core.config import ChannelIntensity, DataConfig
from medseg.core.errors import ConfigError
from medseg.core.keys import IMAGE, LABEL
from medseg.transforms.io import LoadImaged

PRESETS = ("ct", "mri", "zscore", "ct_fingerprint", "us", "rgb_mean05_std05")
#: Presets of 2D photographs ``(C, H, W)``: no RAS orientation, no resampling (see :func:`preprocessing`).
PHOTO_PRESETS = ("rgb_mean05_std05",)
FG_INDICES, BG_INDICES = "fg_indices", "bg_indices"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # medseg tensors are RAS


def zscore(image: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """nnU-Net's ``ZScoreNormalization`` of every channel of ``image`` ``(C, *S)`` over all its voxels.

    ``(x - mean) / max(std, eps)`` with the population standard deviation, computed in float64 and returned in
    float32 (nnU-Net's target dtype). The type (e.g. ``MetaTensor`` and its affine) is kept.
    """
    x = image.double()
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0).clamp_min(eps)
    return ((x - mean) / std).float()


class ZScoreNormalized(MapTransform):
    """Dictionary transform applying :func:`zscore` to ``keys`` (nnU-Net ``ZScoreNormalization``, no mask).

    Args:
        keys: the keys to normalise.
        eps: lower bound of the standard deviation.
    """

    def __init__(self, keys: Any, eps: float = 1e-8) -> None:
        super().__init__(keys)
        self.eps = eps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = zscore(torch.as_tensor(d[key]) if not isinstance(d[key], torch.Tensor) else d[key], self.eps)
        return d


def ct_fingerprint_normalize(image: torch.Tensor, stats: Sequence[ChannelIntensity], eps: float = 1e-8) -> torch.Tensor:
    """nnU-Net's ``CTNormalization`` of ``image`` ``(C, *S)``: channel ``c`` clipped to ``[low, high]`` of
    ``stats[c]``, minus its ``mean``, divided by ``max(std, eps)``; float32 out, the type (``MetaTensor``) kept.

    Raises:
        ConfigError: ``stats`` does not hold one entry per channel.
    """
    if len(stats) != image.shape[0]:
        raise ConfigError(
            f"data.intensity holds {len(stats)} channel entries for an image with {image.shape[0]} channels",
            expected="one (low, high, mean, std) entry per input channel",
            hint="plan the dataset again with `medseg plan`",
        )
    out = image.float().clone()
    for c, st in enumerate(stats):
        out[c] = (out[c].clamp(st.low, st.high) - st.mean) / max(st.std, eps)
    return out


class FingerprintCTNormalized(MapTransform):
    """Dictionary transform applying :func:`ct_fingerprint_normalize` to ``keys`` with fixed per-channel numbers.

    Args:
        keys: the keys to normalise.
        stats: one :class:`~medseg.core.config.ChannelIntensity` per channel.
    """

    def __init__(self, keys: Any, stats: Sequence[ChannelIntensity]) -> None:
        super().__init__(keys)
        self.stats = tuple(stats)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = ct_fingerprint_normalize(torch.as_tensor(d[key]), self.stats)
        return d


def intensity(
    preset: str,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    intensity_stats: Sequence[ChannelIntensity] = (),
) -> list:
    """Intensity normalisation of the ``image`` key for ``preset`` (one of :data:`PRESETS`).

    ``intensity_stats`` (``data.intensity``) is required by ``ct_fingerprint`` and refused by the others.
    """
    if preset == "ct_fingerprint":
        if not intensity_stats:
            raise ConfigError(
                "the ct_fingerprint preset needs data.intensity (low, high, mean, std per channel)",
                hint="let `medseg plan` / `medseg train` without --config fill it from the dataset",
            )
        return [FingerprintCTNormalized(IMAGE, intensity_stats)]
    if intensity_stats:
        raise ConfigError(
            f"data.intensity is given but the preset is {preset!r}",
            expected="data.intensity with the ct_fingerprint preset only",
            hint="drop data.intensity or set data.preset: ct_fingerprint",
        )
    if preset == "ct":
        low, high = ct_window
        if not low < high:
            raise ConfigError(f"ct_window must be increasing, got {ct_window}", hint="e.g. ct_window: [-1000, 1000]")
        return [ScaleIntensityRanged(IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)]
    if preset == "mri":
        return [NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True)]
    if preset == "zscore":
        return [ZScoreNormalized(IMAGE)]
    if preset == "us":
        return [ScaleIntensityRangePercentilesd(IMAGE, 1.0, 99.0, 0.0, 1.0, clip=True, channel_wise=True)]
    if preset == "rgb_mean05_std05":
        return [ScaleIntensityRanged(IMAGE, a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0, clip=True)]
    raise ConfigError(f"unknown intensity preset {preset!r}", expected=f"one of {PRESETS}")


def preprocessing(
    preset: str,
    spacing: Sequence[float] | None,
    *,
    with_label: bool,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    crop_foreground: bool = False,
    load: bool = True,
    intensity_stats: Sequence[ChannelIntensity] = (),
) -> Compose:
    """Deterministic part: load, RAS orientation, resampling, intensity, optional foreground crop.

    Args:
        preset: one of :data:`PRESETS`.
        spacing: target spacing in mm, or ``None`` to keep the image's own.
        with_label: also process the ``label`` key (nearest-neighbour resampling).
        ct_window: HU window of the CT preset.
        crop_foreground: crop to the bounding box of non-zero image voxels.
        load: start with :class:`LoadImaged` (``False`` when images arrive already loaded).
        intensity_stats: per-channel numbers of the ``ct_fingerprint`` preset.

    Returns:
        A ``Compose`` mapping ``{"image": path(s) | MetaTensor (C, X, Y, Z)[, "label": ...]}`` to tensors.
    """
    if preset in PHOTO_PRESETS:
        raise ConfigError(
            f"the {preset} preset is for 2D photographs (C, H, W), not volumes",
            expected=f"a volume preset, one of {[p for p in PRESETS if p not in PHOTO_PRESETS]}",
            hint="classification models read images with medseg.data.classification's transforms",
        )
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps: list = [LoadImaged(keys, allow_external_data=True)] if load else []  # dataset files on local disk
    steps.append(Orientationd(keys, axcodes="RAS", labels=RAS_LABELS))
    if spacing is not None:
        steps.append(Spacingd(keys, pixdim=tuple(spacing), mode=modes))
    steps += intensity(preset, ct_window, intensity_stats)
    if crop_foreground:
        steps.append(CropForegroundd(keys, source_key=IMAGE, margin=4, allow_smaller=True))
    steps.append(EnsureTyped(keys, track_meta=True))
    return Compose(steps)


def preprocessing_for(data: DataConfig, default_preset: str, *, with_label: bool, load: bool = True) -> Compose:
    """:func:`preprocessing` as a run's ``data`` section describes it (``default_preset``: the model card's)."""
    return preprocessing(
        data.preset or default_preset,
        data.spacing,
        with_label=with_label,
        ct_window=data.ct_window,
        crop_foreground=data.crop_foreground,
        load=load,
        intensity_stats=data.intensity,
    )


def training_sampling(roi_size: Sequence[int], fg_ratio: float, num_samples: int = 1) -> list:
    """Patch sampling: pad to the ROI, then crop ``num_samples`` patches, ``fg_ratio`` of them on foreground."""
    keys = [IMAGE, LABEL]
    return [
        SpatialPadd(keys, spatial_size=tuple(roi_size)),
        FgBgToIndicesd(LABEL, fg_postfix=f"_{FG_INDICES}", bg_postfix=f"_{BG_INDICES}"),
        RandCropByPosNegLabeld(
            keys,
            label_key=LABEL,
            spatial_size=tuple(roi_size),
            pos=fg_ratio,
            neg=1.0 - fg_ratio,
            num_samples=num_samples,
            fg_indices_key=f"{LABEL}_{FG_INDICES}",
            bg_indices_key=f"{LABEL}_{BG_INDICES}",
        ),
    ]


def augmentation(preset: str) -> list:
    """Training augmentation: flips, rotation/scaling, intensity (nnU-Net-like probabilities)."""
    keys = [IMAGE, LABEL]
    steps: list = [
        RandAffined(
            keys,
            prob=0.2,
            rotate_range=(0.26, 0.26, 0.26),
            scale_range=(0.15, 0.15, 0.15),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(IMAGE, factors=0.1, prob=0.15),
        RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.15),
        RandGaussianNoised(IMAGE, prob=0.1, std=0.05),
    ]
    if preset in ("mri", "zscore"):
        steps.append(RandAdjustContrastd(IMAGE, prob=0.15, gamma=(0.7, 1.5)))
    return steps


def training_transforms(
    preset: str,
    spacing: Sequence[float] | None,
    roi_size: Sequence[int],
    fg_ratio: float,
    *,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    crop_foreground: bool = False,
    intensity_stats: Sequence[ChannelIntensity] = (),
) -> Compose:
    """Preprocessing + sampling + augmentation. ``CacheDataset`` caches everything before the first random step."""
    pre = preprocessing(
        preset,
        spacing,
        with_label=True,
        ct_window=ct_window,
        crop_foreground=crop_foreground,
        intensity_stats=intensity_stats,
    )
    return Compose([*pre.transforms, *training_sampling(roi_size, fg_ratio), *augmentation(preset)])


def training_transforms_for(data: DataConfig, default_preset: str, roi_size: Sequence[int], fg_ratio: float) -> Compose:
    """:func:`training_transforms` as a run's ``data`` section describes it (``default_preset``: the model card's)."""
    return training_transforms(
        data.preset or default_preset,
        data.spacing,
        roi_size,
        fg_ratio,
        ct_window=data.ct_window,
        crop_foreground=data.crop_foreground,
        intensity_stats=data.intensity,
    )
