"""MONAI transform presets (CT, MRI) and medseg's loading transforms."""

from medseg.transforms.presets import PRESETS, augmentation, intensity, preprocessing, training_transforms

__all__ = ["PRESETS", "augmentation", "intensity", "preprocessing", "training_transforms"]
