"""``Predictor``: a trained model plus its preprocessing, mapping masks back to the input's exact grid.

The input is brought to the training frame once (RAS orientation, target spacing, intensity preset, as in
training), predicted by sliding window, and the class probabilities are resampled by affine onto the input's own
voxel grid before the argmax. The mask therefore has the input's shape, spacing, origin and direction whatever
reorientation, resampling or cropping happened in between.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from torch import nn

from medseg.core.config import ExperimentConfig, load_config
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError, ModelInputError
from medseg.core.keys import IMAGE
from medseg.inference.sliding import WindowSettings, plain, sliding_window_probs
from medseg.io import load_image
from medseg.models import ModelCard, create_model
from medseg.models.checkpoint import load_state_dict_checked
from medseg.training.rundir import RunDir, load_checkpoint
from medseg.transforms.presets import preprocessing_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelStat:
    """Size of one label in a mask."""

    name: str
    value: int
    voxels: int
    volume_ml: float


@dataclass
class Prediction:
    """A mask on the input's grid, with its label names and statistics.

    Attributes:
        mask: integer labels ``(X, Y, Z)`` as a ``MetaTensor`` whose affine is the input's.
        image: the input image ``(C, X, Y, Z)`` as loaded (the geometry reference for writers).
        label_names: names of label values 0..N-1.
        probabilities: class probabilities ``(C_out, X, Y, Z)`` when requested.
    """

    mask: MetaTensor
    image: MetaTensor
    label_names: tuple[str, ...]
    probabilities: torch.Tensor | None = None
    stats: list[LabelStat] = field(default_factory=list)

    def stats_dict(self) -> dict[str, Any]:
        """JSON-friendly label statistics."""
        return {
            "labels": {s.name: {"value": s.value, "voxels": s.voxels, "volume_ml": s.volume_ml} for s in self.stats},
            "label_names": list(self.label_names),
            "shape": [int(s) for s in self.mask.shape],
        }


def label_statistics(mask: torch.Tensor, affine: torch.Tensor, label_names: tuple[str, ...]) -> list[LabelStat]:
    """Voxel count and volume in mL of every foreground label of ``mask (X, Y, Z)``."""
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = torch.bincount(torch.as_tensor(mask).reshape(-1).long(), minlength=len(label_names))
    return [
        LabelStat(name, value, int(counts[value]), round(int(counts[value]) * voxel_ml, 3))
        for value, name in enumerate(label_names)
        if value > 0
    ]


class Predictor:
    """Run a trained segmentation model on whole images.

    Args:
        model: network returning logits ``(B, C_out, *S)``, carrying ``.card``.
        config: the run's resolved experiment config.
        device: ``cpu``, ``cuda`` or ``auto``.

    Examples::

        >>> predictor = Predictor.from_run_dir("runs/demo")
        >>> result = predictor.predict("subject.nii.gz")
        >>> save_mask(result.mask, result.image, "subject_mask.nii.gz")
    """

    def __init__(self, model: nn.Module, config: ExperimentConfig, device: str = "auto") -> None:
        self.card: ModelCard = model.card  # type: ignore[attr-defined]
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocessing_for(config.data, self.card.intensity_preset, with_label=False, load=False)
        self.window = WindowSettings.from_config(config, self.card)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.card.label_names

    @classmethod
    def from_run_dir(cls, run: str | Path, checkpoint: str = "best", device: str = "auto") -> Any:
        """Rebuild model, preprocessing and window settings from a run directory (``config.yaml`` + checkpoint).

        A model whose card ``needs_prompts`` (DB-SAM, SAM-UNet) gets a
        :class:`~medseg.inference.prompted.PromptPredictor` instead, whose ``predict`` takes ``prompts=``.

        Args:
            run: a run directory written by ``medseg train``.
            checkpoint: ``best`` or ``last``.
            device: ``auto``, ``cpu`` or ``cuda``.

        Returns:
            A :class:`Predictor`, or a :class:`~medseg.inference.prompted.PromptPredictor` for promptable models.
        """
        rd = RunDir(Path(run))
        if not rd.root.is_dir():
            raise ConfigError(f"run directory {rd.root} does not exist", hint="pass the folder `medseg train` wrote")
        if not rd.config.is_file():
            raise ConfigError(
                f"{rd.root} is not a medseg run directory (no config.yaml)",
                expected="config.yaml, card.json and checkpoints/{best,last}.pt",
                hint="pass the folder `medseg train` wrote",
            )
        if checkpoint not in ("best", "last"):
            raise ConfigError(f"unknown checkpoint {checkpoint!r}", expected="'best' or 'last'")
        config = load_config(rd.config)
        ckpt = load_checkpoint(rd.best if checkpoint == "best" else rd.last)
        card = ModelCard.from_dict(ckpt["card"])
        model = create_model(
            ckpt["model_name"],
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            label_names=card.label_names,
            **ckpt["model_kwargs"],
        )
        load_state_dict_checked(model, ckpt["model"], source=str(rd.root))
        if card.needs_prompts:
            from medseg.inference.prompted import PromptPredictor

            return PromptPredictor(model, config, device=device)
        return cls(model, config, device=device)

    @staticmethod
    def from_nnunet_results(
        folder: str | Path, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth", device: str = "auto"
    ) -> Any:
        """A predictor for any nnU-Net v2 results folder, with this class's ``predict`` interface.

        See :class:`medseg.integrations.nnunet.results.NnUNetResultsPredictor`.
        """
        from medseg.integrations.nnunet.results import NnUNetResultsPredictor

        return NnUNetResultsPredictor.from_folder(Path(folder), fold=fold, checkpoint=checkpoint, device=device)

    def predict(
        self, image: str | Path | MetaTensor, *, tta: bool | None = None, keep_probabilities: bool = False
    ) -> Prediction:
        """Segment one image.

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)``.
            tta: override the run's flip test-time augmentation setting.
            keep_probabilities: also return the probabilities on the input grid.

        Returns:
            A :class:`Prediction` whose mask lies on the input's voxel grid.
        """
        original = image if isinstance(image, MetaTensor) else load_image(image)
        if original.shape[0] != self.card.in_channels:
            raise ModelInputError(
                f"{_name(original)} has {original.shape[0]} channel(s) but model {self.card.name!r} takes "
                f"{self.card.in_channels}",
                hint="give one file per channel in the order of training (e.g. case_0000, case_0001)",
            )
        prepared = self.preprocess({IMAGE: original.clone()})[IMAGE]
        window = self.window if tta is None else dataclasses.replace(self.window, tta=tta)
        x = plain(prepared)[None].float().to(self.device)
        probs = sliding_window_probs(self.model, x, window)[0].cpu()
        probs = MetaTensor(probs, affine=prepared.affine)
        on_input = to_input_grid(probs, original)
        mask_array = on_input.argmax(0).to(torch.uint8 if len(self.label_names) < 256 else torch.int32)
        mask = MetaTensor(mask_array, affine=original.affine.clone(), meta=_meta_without_affine(original))
        return Prediction(
            mask=mask,
            image=original,
            label_names=self.label_names,
            probabilities=on_input if keep_probabilities else None,
            stats=label_statistics(mask_array, original.affine, self.label_names),
        )


def to_input_grid(probs: MetaTensor, original: MetaTensor) -> torch.Tensor:
    """Resample probabilities ``(C, *S')`` (with their own affine) onto the voxel grid of ``original``."""
    src = np.asarray(probs.affine, dtype=np.float64)
    dst = np.asarray(original.affine, dtype=np.float64)
    if probs.shape[1:] == original.shape[1:] and np.allclose(src, dst, atol=1e-6):
        return torch.as_tensor(probs)
    resampler = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)
    out = resampler(probs, dst_affine=torch.as_tensor(dst), spatial_size=tuple(original.shape[1:]))
    return torch.as_tensor(out).float()


def _name(image: MetaTensor) -> str:
    return Path(str(image.meta.get("filename_or_obj", "input image"))).name


def _meta_without_affine(image: MetaTensor) -> dict[str, Any]:
    return {k: v for k, v in image.meta.items() if k != "affine"}
