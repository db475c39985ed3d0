"""``Predictor``: a trained model plus its preprocessing, mapping masks back to the input's exact grid.

The input is brought to the training frame once (RAS orientation, target spacing, intensity preset, as in
training), predicted by sliding window, and the class probabilities are resampled by affine onto the input's own
voxel grid before the argmax. The mask therefore has the input's shape, spacing, origin and direction whatever
reorientation, resampling or cropping happened in between.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.keys import IMAGE
from medseg.inference.contract import SegmentationPredictor
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import Prompts
from medseg.inference.sliding import WindowSettings, plain, sliding_window_probs
from medseg.io import load_image
from medseg.models import ModelCard
from medseg.transforms.presets import preprocessing_for

logger = logging.getLogger(__name__)


class Predictor(SegmentationPredictor):
    """Run a trained segmentation model on whole images.

    Args:
        model: network returning logits ``(B, C_out, *S)``, carrying ``.card``.
        config: the run's resolved experiment config.
        device: ``cpu``, ``cuda`` or ``auto``.

    Examples::

        >>> predictor = medseg.open_predictor("runs/demo")  # a Predictor for a dense model
        >>> result = predictor.predict("subject.nii.gz")
        >>> save_mask(result.mask, result.image, "subject_mask.nii.gz")
    """

    def __init__(self, model: nn.Module, config: ExperimentConfig, device: str = "auto") -> None:
        self.card = cast(ModelCard, model.card)  # create_model attaches the card to the module
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocessing_for(config.data, self.card.intensity_preset, with_label=False, load=False)
        self.window = WindowSettings.from_config(config, self.card)

    @property
    def tta_default(self) -> bool:
        """The run's flip test-time augmentation setting (``infer.tta``)."""
        return bool(self.window.tta)

    def predict(
        self,
        image: str | Path | MetaTensor,
        *,
        prompts: Prompts | None = None,
        tta: bool | None = None,
        keep_probabilities: bool = False,
    ) -> Prediction:
        """Segment one image.

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)``.
            prompts: must be ``None`` (a dense model takes no prompts).
            tta: override the run's flip test-time augmentation setting.
            keep_probabilities: also return the probabilities on the input grid.

        Returns:
            A :class:`Prediction` whose mask lies on the input's voxel grid.
        """
        self.check_prompts(prompts)
        original = image if isinstance(image, MetaTensor) else load_image(image)
        self.check_image(original)
        prepared = self.preprocess({IMAGE: original.clone()})[IMAGE]
        window = self.window if tta is None else dataclasses.replace(self.window, tta=tta)
        x = plain(prepared)[None].float().to(self.device)
        probs = sliding_window_probs(self.model, x, window)[0].cpu()
        probs = MetaTensor(probs, affine=prepared.affine)
        on_input = to_input_grid(probs, original)
        probabilities = on_input if keep_probabilities else None
        return Prediction.on_input_grid(on_input.argmax(0), original, self.label_names, probabilities)


def to_input_grid(probs: MetaTensor, original: MetaTensor) -> torch.Tensor:
    """Resample probabilities ``(C, *S')`` (with their own affine) onto the voxel grid of ``original``."""
    src = np.asarray(probs.affine, dtype=np.float64)
    dst = np.asarray(original.affine, dtype=np.float64)
    if probs.shape[1:] == original.shape[1:] and np.allclose(src, dst, atol=1e-6):
        return torch.as_tensor(probs)
    resampler = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=np.float64)
    out = resampler(probs, dst_affine=torch.as_tensor(dst), spatial_size=tuple(original.shape[1:]))
    return torch.as_tensor(out).float()
