"""``PromptPredictor``: whole-image inference for promptable 2D models (DB-SAM, SAM-UNet), slice by slice.

The image keeps its own voxel grid: SAM models see one slice at a time (see :mod:`medseg.transforms.sam`), so
nothing is reoriented or resampled and the mask lands on the input's grid by construction. Each prompt object
(a box and/or points, see :mod:`medseg.inference.prompts`) is segmented on every slice of its box's z-range (a
point-only object: the slices of its foreground points) and becomes one label value.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError, ModelInputError
from medseg.inference.contract import Progress, SegmentationPredictor, image_name
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import PromptObject, Prompts
from medseg.io import load_image
from medseg.models import ModelCard
from medseg.transforms.sam import SamFrame, prepare_slice, sam_intensity, slice_to_volume, volume_slice

logger = logging.getLogger(__name__)

__all__ = ["PromptPredictor"]


class _Job:
    """One (object, slice) model call: the box ``(x0, y0, x1, y1)`` and the points on that slice."""

    __slots__ = ("box", "k", "labels", "points", "z")

    def __init__(self, k: int, z: int, obj: PromptObject) -> None:
        self.k, self.z = k, z
        self.box = None if obj.box is None else (obj.box.lo[0], obj.box.lo[1], obj.box.hi[0], obj.box.hi[1])
        on_slice = [p for p in obj.points if int(p.coord[2]) == z]
        self.points = [(p.coord[0], p.coord[1]) for p in on_slice]
        self.labels = [p.label for p in on_slice]

    @property
    def key(self) -> tuple[bool, int]:
        """Jobs with equal keys share a batch (same prompt tensor shapes)."""
        return self.box is not None, len(self.points)


def _object_slices(obj: PromptObject) -> list[int]:
    if obj.box is not None:
        return list(range(int(obj.box.lo[2]), int(obj.box.hi[2]) + 1))
    return sorted({int(p.coord[2]) for p in obj.points if p.label == 1})


class PromptPredictor(SegmentationPredictor):
    """Run a promptable 2D model (``card.needs_prompts``) on whole images, slice by slice.

    The model contract: ``model(x (B, 3, S, S), *, boxes (B, 4) | None, points ((B, N, 2), (B, N)) | None)``
    returns logits ``(B, 1, S, S)`` in the SAM frame of side ``S = model.img_size``.

    Intensities go through :func:`medseg.transforms.sam.sam_intensity` once per image (one scale for all slices).
    Flip test-time augmentation does not apply: a prompt belongs to one orientation, so ``tta`` is ignored.

    Args:
        model: the promptable network, carrying ``.card``.
        config: the run's resolved experiment config.
        device: ``cpu``, ``cuda`` or ``auto``.
        slice_batch: slices per forward pass.

    Examples::

        >>> predictor = medseg.open_predictor("runs/sam_unet")   # a PromptPredictor for a promptable model
        >>> prompts = Prompts.from_cli(["30,40,90,110,10,25"], [])
        >>> result = predictor.predict("subject.nii.gz", prompts=prompts)
    """

    def __init__(self, model: nn.Module, config: ExperimentConfig, device: str = "auto", slice_batch: int = 4) -> None:
        if slice_batch < 1:
            raise ConfigError(f"slice_batch={slice_batch}", expected="an integer >= 1")
        self.card = cast(ModelCard, model.card)  # create_model attaches the card to the module
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.size = int(getattr(model, "img_size", self.card.roi_size[-1]))
        self.slice_batch = int(slice_batch)

    def check_image(self, image: MetaTensor) -> None:
        """Refuse an image that is not ``(C, X, Y, Z)`` with ``C`` 1 (grey) or 3 (RGB).

        Raises:
            ModelInputError: wrong dimensionality or channel count.
        """
        if image.ndim != 4 or image.shape[0] not in (1, 3):
            raise ModelInputError(
                f"{image_name(image)} has shape {tuple(image.shape)} but model {self.card.name!r} takes grey or RGB",
                expected="(C, X, Y, Z) with C = 1 (grey) or 3 (RGB)",
            )

    def check_input(self, image: MetaTensor, prompts: Prompts | None = None) -> None:
        """Prompts given, a grey or RGB image, and every prompt inside it.

        Raises:
            ModelInputError: in this model's words (a prompt outside the image names the bounds).
        """
        super().check_input(image, prompts)
        if prompts is not None:
            prompts.to_voxel(image.affine, tuple(int(s) for s in image.shape[1:]))

    def predict(
        self,
        image: str | Path | MetaTensor,
        *,
        prompts: Prompts | None = None,
        tta: bool | None = None,
        keep_probabilities: bool = False,
        progress: Progress | None = None,
    ) -> Prediction:
        """Segment the prompted objects of one image.

        Object ``k`` of ``prompts`` becomes label value ``k + 1``: a voxel takes it where the object's probability
        (sigmoid of the logits mapped back to the slice) exceeds 0.5 and every other object's probability there
        (ties go to the lower value).

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)`` with
                ``C`` 1 (grey) or 3 (RGB).
            prompts: the objects to segment, in voxel or RAS coordinates of ``image``.
            tta: ignored (flip augmentation does not apply to prompted models).
            keep_probabilities: also return ``(K + 1, X, Y, Z)`` probabilities: channel ``k + 1`` is object ``k``'s,
                channel 0 is ``1 - max_k p_k``.
            progress: called with ``(slices_done, slices_total)``.

        Returns:
            A :class:`~medseg.inference.predictor.Prediction` on the input's grid with ``label_names``
            ``("background", name_1, ...)`` (names from the prompts, else ``object_k``).

        Raises:
            ModelInputError: no prompts, a prompt outside the image, or an image that is not grey or RGB.
        """
        del tta
        self.check_prompts(prompts)
        assert prompts is not None  # check_prompts refused None for a prompted model
        original = image if isinstance(image, MetaTensor) else load_image(image)
        self.check_image(original)
        rgb = sam_intensity(original)
        spatial = tuple(int(s) for s in original.shape[1:])
        voxel = prompts.to_voxel(original.affine, spatial)
        best, index, fg = self._object_probabilities(rgb, voxel, keep=keep_probabilities, progress=progress)
        names = ("background", *(o.name or f"object_{k + 1}" for k, o in enumerate(voxel.objects)))
        probabilities = torch.cat([(1.0 - best)[None], fg]) if fg is not None else None
        return Prediction.on_input_grid(torch.where(best > 0.5, index + 1, 0), original, names, probabilities)

    def _object_probabilities(
        self, rgb: torch.Tensor, prompts: Prompts, keep: bool = False, progress: Progress | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Highest object probability ``(X, Y, Z)``, its object index, and (``keep``) every object's ``(K, X, Y, Z)``.

        Only the running maximum is held unless ``keep``: many single-slice objects (one per label and slice, as
        in box-prompted evaluation) then cost one volume, not one volume per object.
        """
        best = torch.zeros(rgb.shape[1:], dtype=torch.float32)
        index = torch.zeros(rgb.shape[1:], dtype=torch.int64)
        fg = torch.zeros((len(prompts.objects), *rgb.shape[1:]), dtype=torch.float32) if keep else None
        groups: dict[tuple[bool, int], list[_Job]] = defaultdict(list)
        for k, obj in enumerate(prompts.objects):
            for z in _object_slices(obj):
                job = _Job(k, z, obj)
                groups[job.key].append(job)
        n_jobs = sum(len(g) for g in groups.values())
        start = time.perf_counter()
        done = 0
        for jobs in groups.values():
            jobs.sort(key=lambda j: (j.z, j.k))  # objects sharing a slice share its preparation
            for i in range(0, len(jobs), self.slice_batch):
                batch = jobs[i : i + self.slice_batch]
                probs = self._run_batch(rgb, batch)
                for job, p in zip(batch, probs, strict=True):
                    p = slice_to_volume(p)
                    if fg is not None:
                        fg[job.k, :, :, job.z] = p
                    top, top_k = best[:, :, job.z], index[:, :, job.z]
                    wins = (p > top) | ((p == top) & (job.k < top_k))  # ties go to the lower label value
                    top[wins], top_k[wins] = p[wins], job.k
                done += len(batch)
                if progress is not None:
                    progress(done, n_jobs)
        elapsed = time.perf_counter() - start
        logger.debug(
            "%s: %d slice prompts in %.2f s (%.1f slices/s)",
            self.card.name,
            n_jobs,
            elapsed,
            n_jobs / max(elapsed, 1e-9),
        )
        return best, index, fg

    @torch.inference_mode()
    def _run_batch(self, rgb: torch.Tensor, batch: list[_Job]) -> torch.Tensor:
        """Probabilities ``(B, rows, cols)`` of one batch of jobs sharing a prompt layout."""
        prepared: dict[int, tuple[torch.Tensor, SamFrame]] = {}
        for job in batch:
            if job.z not in prepared:
                prepared[job.z] = prepare_slice(volume_slice(rgb, job.z), self.size)
        frame = prepared[batch[0].z][1]
        x = torch.stack([prepared[job.z][0] for job in batch]).to(self.device)
        kwargs: dict[str, Any] = {"boxes": None, "points": None}
        if batch[0].box is not None:
            # A batch shares one prompt layout (``_Job.key``): every job of it has a box.
            boxes = [frame.box_to_model(job.box) for job in batch if job.box is not None]
            kwargs["boxes"] = torch.stack(boxes).to(self.device)
        if batch[0].points:
            coords = torch.stack([frame.points_to_model(job.points) for job in batch]).to(self.device)
            labels = torch.tensor([job.labels for job in batch], dtype=torch.int64, device=self.device)
            kwargs["points"] = (coords, labels)
        logits = self.model(x, **kwargs)
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ModelInputError(
                f"model {self.card.name!r} returned logits of shape {tuple(logits.shape)}",
                expected=f"(B, 1, {self.size}, {self.size})",
            )
        return torch.sigmoid(frame.logits_to_slice(logits[:, 0].float().cpu()))
