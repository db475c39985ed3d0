"""``Predictor``: a trained model plus its preprocessing, mapping masks back to the input's exact grid.

The input is brought to the training frame once (RAS orientation, target spacing, intensity preset, as in
training), cropped to its foreground box (``infer.crop_foreground``), and run through the sliding-window engine
(:mod:`medseg.inference.engine`), whose logits chunks go straight onto the input's own voxel grid
(:class:`~medseg.inference.gridmap.LabelSink`): copied exactly where the grids differ only by a permutation, flip or
shift, interpolated linearly otherwise, then turned into labels. The mask therefore has the input's shape, spacing,
origin and direction whatever reorientation, resampling or cropping happened in between, and no full-image
probability volume is held unless probabilities are asked for.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import cast

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.device import pick_device
from medseg.core.errors import ConfigError
from medseg.core.keys import IMAGE
from medseg.inference.backends import Backend
from medseg.inference.contract import Progress, SegmentationPredictor
from medseg.inference.engine import stream_logits
from medseg.inference.gridmap import GridMap, LabelSink, ProbabilityFiles, ProbabilityOutput
from medseg.inference.planar import FrameWise, frame_window
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import Prompts
from medseg.inference.sliding import WindowSettings, plain
from medseg.io import load_image
from medseg.models import ModelCard
from medseg.transforms.presets import preprocessing_for

logger = logging.getLogger(__name__)


#: Default foreground floor of ``infer.crop_foreground`` per intensity preset (``None``: non-zero voxels).
FOREGROUND_FLOOR: dict[str, float | None] = {"ct": -500.0, "ct_fingerprint": -500.0}


class Predictor(SegmentationPredictor):
    """Run a trained segmentation model on whole images.

    Args:
        model: network returning logits ``(B, C_out, *S)``, carrying ``.card``.
        config: the run's resolved experiment config.
        device: ``cpu``, ``cuda`` or ``auto``.
        cache_dir: where the OpenVINO backend caches its compiled model (the run directory's ``cache/``).

    Examples::

        >>> predictor = medseg.open_predictor("runs/demo")  # a Predictor for a dense model
        >>> result = predictor.predict("subject.nii.gz")
        >>> save_mask(result.mask, result.image, "subject_mask.nii.gz")
    """

    def __init__(
        self, model: nn.Module, config: ExperimentConfig, device: str = "auto", *, cache_dir: Path | None = None
    ) -> None:
        self.card = cast(ModelCard, model.card)  # create_model attaches the card to the module
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocessing_for(config.data, self.card.intensity_preset, with_label=False, load=False)
        self.window = WindowSettings.from_config(config, self.card)
        network: nn.Module = self.model
        if self.card.spatial_dims == 2:  # frame by frame: depth-1 windows over (C, X, Y, Z|T) (medseg.inference.planar)
            self.window = frame_window(self.window)
            network = FrameWise(self.model)
        inf = config.infer
        window_shape = (self.window.sw_batch_size, self.card.in_channels, *self.window.roi_size)
        self.backend = Backend(
            network,
            self.device,
            precision=inf.precision,
            backend=inf.backend,
            window=window_shape,
            cache_dir=cache_dir,
        )
        preset = config.data.preset or self.card.intensity_preset
        self.crop_foreground = inf.crop_foreground
        self.foreground_floor = (
            inf.foreground_floor if inf.foreground_floor is not None else FOREGROUND_FLOOR.get(preset)
        )

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
        progress: Progress | None = None,
        probabilities_out: ProbabilityOutput | None = None,
    ) -> Prediction:
        """Segment one image.

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)``.
            prompts: must be ``None`` (a dense model takes no prompts).
            tta: override the run's flip test-time augmentation setting.
            keep_probabilities: also return the probabilities ``(C_out, X, Y, Z)`` (float16) on the input grid.
            progress: called with ``(windows_done, windows_total)``.
            probabilities_out: write the probabilities on the input grid to these files, a few planes at a time
                (:class:`~medseg.inference.gridmap.ProbabilityFiles`; 3D inputs), never holding all of them.

        Returns:
            A :class:`Prediction` whose mask lies on the input's voxel grid.
        """
        self.check_prompts(prompts)
        original = image if isinstance(image, MetaTensor) else load_image(image)
        self.check_image(original)
        files = None
        if probabilities_out is not None:
            if original.ndim != 4:
                raise ConfigError(
                    "probabilities are saved to files for 3D inputs only", expected="a (C, X, Y, Z) image"
                )
            files = ProbabilityFiles(probabilities_out, original.shape[1:], original.affine, self.label_names)
        if original.ndim == 3:  # a 2D image (C, X, Y) for a 2D model: segmented as one frame (C, X, Y, 1)
            frame = self.predict(
                cast(MetaTensor, original.unsqueeze(-1)),
                tta=tta,
                keep_probabilities=keep_probabilities,
                progress=progress,
            )
            probs = frame.probabilities[..., 0] if frame.probabilities is not None else None
            return Prediction.on_input_grid(frame.mask.as_tensor()[..., 0], original, self.label_names, probs)
        prepared = self.preprocess({IMAGE: original.clone()})[IMAGE]
        x = plain(prepared).float()
        affine = np.asarray(prepared.affine, dtype=np.float64)
        box: tuple[slice, ...] | None = tuple(slice(0, int(n)) for n in x.shape[1:])
        if self.crop_foreground:
            box = foreground_box(original, affine, tuple(x.shape[1:]), self.foreground_floor)
        channels = self.card.out_channels
        if box is None:  # nothing above the floor: all background
            grid = GridMap.from_affines(affine, x.shape[1:], original.affine, original.shape[1:])
            sink = LabelSink(grid, channels, keep_probabilities=keep_probabilities, probability_files=files)
            labels = np.zeros(tuple(original.shape[1:]), dtype=sink.labels.dtype)
        else:
            x = x[(slice(None), *box)].clone()  # a copy, so that the full preprocessed image can be freed
            shift = np.eye(4)
            shift[:3, 3] = [b.start for b in box]
            grid = GridMap.from_affines(affine @ shift, x.shape[1:], original.affine, original.shape[1:])
            del prepared  # the window source is the cropped copy x
            sink = LabelSink(grid, channels, keep_probabilities=keep_probabilities, probability_files=files)
            settings = self.window.engine(tta)
            for axis, start, logits in stream_logits(self.backend, x, settings, progress=progress):
                sink.consume(axis, start, logits)
            labels = sink.finish()
        if files is not None:
            files.close()
        return Prediction.on_input_grid(
            torch.from_numpy(labels), original, self.label_names, sink.probabilities if keep_probabilities else None
        )


def foreground_box(
    original: MetaTensor, affine: np.ndarray, shape: tuple[int, ...], floor: float | None, margin: int = 1
) -> tuple[slice, ...] | None:
    """The box of the network grid ``(shape, affine)`` covering the input's foreground voxels (``None``: none).

    Foreground: any channel above ``floor`` (non-zero when ``floor`` is ``None``). The box is found on the input grid
    and mapped through both affines, widened by ``margin`` voxels for interpolation.
    """
    data = plain(original)
    mask = (data > floor).any(0) if floor is not None else (data != 0).any(0)
    if not bool(mask.any()):
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        lo.append(int(hit[0]) - 0.5)
        hi.append(int(hit[-1]) + 0.5)
    corners = np.array([[c[i] for i in range(3)] + [1.0] for c in _corners(lo, hi)]).T
    to_net = np.linalg.inv(affine) @ np.asarray(original.affine, dtype=np.float64)
    net = (to_net @ corners)[:3]
    start = np.floor(net.min(axis=1) + 0.5).astype(int) - margin
    stop = np.ceil(net.max(axis=1) - 0.5).astype(int) + 1 + margin
    box = tuple(slice(max(0, int(a)), min(int(n), int(b))) for a, b, n in zip(start, stop, shape, strict=True))
    return None if any(b.stop <= b.start for b in box) else box


def _corners(lo: list[float], hi: list[float]) -> list[tuple[float, ...]]:
    return list(itertools.product(*zip(lo, hi, strict=True)))
