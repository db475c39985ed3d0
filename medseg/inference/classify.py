"""``ClassificationPredictor``: a trained image classifier (MedViTV2) rebuilt from its run directory.

The contract: a classifier is opened like every other model folder (:func:`medseg.open_predictor`, the ``run``
opener) and shares what every predictor has - ``card``, ``label_names`` (the class names), ``task``,
``check_prompts`` and ``check_input`` - but its answer is one class per image, not a mask on the input grid, so it
answers :meth:`ClassificationPredictor.predict_class` with a :class:`ClassPrediction`. Its ``predict`` (the mask
method of :class:`~medseg.inference.contract.SegmentationPredictor`) refuses with a ``ModelInputError`` that names
``predict_class``, so a caller that does not look at ``task`` gets a 4xx / one-line error, never a wrong mask.

Preprocessing is training's evaluation transform (:func:`medseg.data.classification.classification_eval_transforms`):
the image as ``(3, H, W)`` 8-bit values (grey replicated), resized to the run's ``model.roi_size``, then the
intensity preset (``rgb_mean05_std05``: ``[0, 255]`` to ``[-1, 1]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.errors import DataError, ModelInputError
from medseg.core.keys import IMAGE
from medseg.data.classification import classification_eval_transforms, image_to_chw
from medseg.inference.contract import Progress, SegmentationPredictor, image_name
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import Prompts
from medseg.io import load_image
from medseg.models import ModelCard

logger = logging.getLogger(__name__)

__all__ = ["ClassPrediction", "ClassificationPredictor"]


@dataclass(frozen=True)
class ClassPrediction:
    """The class of one image.

    Attributes:
        label: index of the most probable class.
        label_name: its name.
        probabilities: softmax probability of every class, in class order.
        label_names: names of all classes, in class order.
    """

    label: int
    label_name: str
    probabilities: tuple[float, ...]
    label_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"label": int, "label_name": str, "probabilities": {name: p}}`` (JSON-friendly, class order)."""
        return {
            "label": self.label,
            "label_name": self.label_name,
            "probabilities": {n: round(p, 6) for n, p in zip(self.label_names, self.probabilities, strict=True)},
        }


class ClassificationPredictor(SegmentationPredictor):
    """Classify 2D images with a trained classifier (``card.task == "classification"``).

    Args:
        model: network returning logits ``(B, num_classes)`` for ``(B, 3, H, W)``, carrying ``.card``.
        config: the run's resolved experiment config (``model.roi_size``: the input ``(H, W)``; ``data.preset``).
        device: ``cpu``, ``cuda`` or ``auto``.

    Examples::

        >>> predictor = medseg.open_predictor("runs/medvit2_tiny_pathmnist")
        >>> predictor.task
        'classification'
        >>> predictor.predict_class("tile.png").to_dict()
        {'label': 3, 'label_name': 'debris', 'probabilities': {...}}
    """

    def __init__(self, model: nn.Module, config: ExperimentConfig, device: str = "auto") -> None:
        self.card = cast(ModelCard, model.card)
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.size = tuple(config.model.roi_size or self.card.roi_size)
        self.transform = classification_eval_transforms(self.size, config.data.preset or self.card.intensity_preset)

    def check_image(self, image: MetaTensor) -> None:
        """Refuse anything but a 2D grey or RGB image ``(C, X, Y)`` or ``(C, X, Y, 1)``, C in 1, 3.

        Raises:
            ModelInputError: a volume, or another channel count.
        """
        shape, name = tuple(image.shape), _name(image)
        planar = len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)
        if not planar:
            raise ModelInputError(
                f"{name} has shape {shape}: model {self.card.name!r} classifies 2D images",
                expected="(C, X, Y) or (C, X, Y, 1): a PNG, JPEG, TIFF, BMP or one DICOM frame",
                hint="save the slice to classify as a 2D image",
            )
        if shape[0] not in (1, 3):
            raise ModelInputError(
                f"{name} has {shape[0]} channels but model {self.card.name!r} takes grey or RGB images",
                expected="1 (grey, replicated) or 3 (RGB) channels",
            )

    def predict(
        self,
        image: str | Path | MetaTensor,
        *,
        prompts: Prompts | None = None,
        tta: bool | None = None,
        keep_probabilities: bool = False,
        progress: Progress | None = None,
    ) -> Prediction:
        """Refused: a classifier gives a class, not a mask (use :meth:`predict_class`).

        Raises:
            ModelInputError: always, naming ``predict_class``.
        """
        raise ModelInputError(
            f"model {self.card.name!r} is a classifier: it answers a class per image, not a mask",
            expected="predict_class(image) -> ClassPrediction (label, label_name, probabilities)",
            hint="check predictor.task; the CLI and the server's predict endpoint do so for you",
        )

    def predict_class(
        self, image: str | Path | MetaTensor | np.ndarray, *, prompts: Prompts | None = None
    ) -> ClassPrediction:
        """Classify one image.

        Args:
            image: a path readable by :func:`medseg.io.load_image`, a loaded ``MetaTensor (C, X, Y[, 1])``, or an
                array ``(H, W)`` / ``(H, W, 3)`` of 8-bit values (rows first, as MedMNIST stores them).
            prompts: refused (classifiers take none); accepted as a keyword so callers can pass what they got.

        Returns:
            The most probable class and every class's probability.

        Raises:
            ModelInputError: prompts given, a volume, or a channel count other than 1 or 3.
            DataError: the file cannot be read, or its values are not 8-bit.
        """
        self.check_prompts(prompts)
        probs = self.probabilities([image])[0]
        label = int(probs.argmax())
        names = self.label_names
        return ClassPrediction(label, names[label], tuple(float(p) for p in probs), tuple(names))

    @torch.no_grad()
    def probabilities(self, images: Sequence[str | Path | MetaTensor | np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Softmax probabilities ``(N, num_classes)`` of ``images`` (as :meth:`predict_class` takes them)."""
        chws = [self._chw(im) for im in images]
        out = []
        for start in range(0, len(chws), batch_size):
            batch = torch.stack([self.transform({IMAGE: x})[IMAGE] for x in chws[start : start + batch_size]])
            logits = self.model(batch.float().to(self.device))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), np.float32)

    def _chw(self, image: str | Path | MetaTensor | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            return image_to_chw(image)
        if isinstance(image, str | Path):
            image = load_image(image)
        if not isinstance(image, torch.Tensor):
            raise DataError(f"cannot classify a {type(image).__name__}", expected="a path, MetaTensor or array")
        self.check_image(image)
        return image_to_chw(image, _name(image))


def _name(image: Any) -> str:
    return image_name(image) if isinstance(image, MetaTensor) else "image"
