"""nnU-Net's preprocessing and networks, medseg's sliding-window engine and streamed export.

:class:`NnUNetEngine` reproduces ``nnUNetPredictor`` for one image: nnU-Net's own preprocessor (transpose, crop to
the non-zero box, normalisation, resampling), windows on nnU-Net's grid with its Gaussian and mirroring, an average
over folds, then the export nnU-Net performs (logits resized to the cropped shape with its order-1 / separate-z
rule, argmax, pasted into the box) — but chunk by chunk through :class:`~medseg.inference.gridmap.LabelSink`, so the
logits of every class never exist at full resolution, and probabilities are only computed when asked for.

Plans whose probability resampling is not nnU-Net's default function, and region-based label sets (sigmoid
outputs), are predicted by ``nnUNetPredictor`` itself (see :meth:`NnUNetEngine.supported`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.inference.backends import Backend
from medseg.inference.contract import Progress
from medseg.inference.engine import EngineSettings, mirror_subsets, stream_logits, trim_heap
from medseg.inference.gridmap import GridMap, LabelSink, ProbabilityFiles
from medseg.integrations.nnunet.lean import lean_forward

logger = logging.getLogger(__name__)

__all__ = ["NnUNetEngine"]

_DEFAULT_RESAMPLING = "resample_data_or_seg_to_shape"


class _FoldEnsemble(nn.Module):
    """Mean logits of one network per fold (nnU-Net averages the folds' logits too)."""

    def __init__(self, networks: Sequence[nn.Module], squeeze_axis: int | None) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.squeeze_axis = squeeze_axis  # 2D configurations: windows (B, C, 1, X, Y) -> the 2D network
        self.lean = True  # the memory-lean forward (off for graph conversion: OpenVINO plans its own memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.squeeze_axis is not None:
            x = x.squeeze(self.squeeze_axis)
        run = lean_forward if self.lean else (lambda net, x: net(x))
        out = run(self.networks[0], x)
        for net in self.networks[1:]:
            out = out + run(net, x)
        out = out / len(self.networks) if len(self.networks) > 1 else out
        return out.unsqueeze(self.squeeze_axis) if self.squeeze_axis is not None else out


class NnUNetEngine:
    """Predict preprocessed-by-nnU-Net images with medseg's engine.

    Args:
        predictor: an initialised ``nnUNetPredictor`` (network, plans, configuration, fold weights).
        device: where the networks run.
        tile_step_size: nnU-Net's step (1 - overlap).
        in_channels: input channels of the networks (for the OpenVINO window shape).
        cache_dir: where the OpenVINO backend caches its compiled model.
        precision, backend: see :class:`medseg.inference.backends.Backend`.
    """

    def __init__(
        self,
        predictor: Any,
        device: torch.device,
        *,
        in_channels: int,
        tile_step_size: float = 0.5,
        precision: str = "auto",
        backend: str = "torch",
        cache_dir: Path | None = None,
    ) -> None:
        self.nn = predictor
        cm = predictor.configuration_manager
        self.patch = tuple(int(p) for p in cm.patch_size)
        self.two_d = len(self.patch) == 2
        networks = []
        for i, params in enumerate(predictor.list_of_parameters):
            # The first fold reuses nnU-Net's network, and nnU-Net's parameter list then points at the networks'
            # own tensors: one copy of the weights in memory, not three (checkpoint, nnU-Net's network, ours).
            net = predictor.network if i == 0 else copy.deepcopy(predictor.network)
            net.load_state_dict(params)
            networks.append(net.eval())
            predictor.list_of_parameters[i] = net.state_dict()
        self.model = _FoldEnsemble(networks, 2 if self.two_d else None)
        self.model.lean = backend != "openvino"
        roi = (1, *self.patch) if self.two_d else self.patch
        self.roi = roi
        self.step = float(tile_step_size)
        self.backend = Backend(
            self.model,
            device,
            precision=precision,  # type: ignore[arg-type]
            backend=backend,  # type: ignore[arg-type]
            window=(1, in_channels, *roi),
            cache_dir=cache_dir,
        )
        axes = predictor.allowed_mirroring_axes or ()
        self.mirror_axes = tuple(int(a) + (1 if self.two_d else 0) for a in axes)

    def _importance(self) -> torch.Tensor:
        """nnU-Net's own Gaussian (float16, peak 10), shaped like the engine's window."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        g = compute_gaussian(self.patch, 1.0 / 8, 10, dtype=torch.float16, device=torch.device("cpu"))
        return g.reshape(self.roi)

    @staticmethod
    def supported(predictor: Any) -> bool:
        """Whether the plans' export can be streamed (nnU-Net's default resampling, softmax labels)."""
        cm = predictor.configuration_manager
        kwargs = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
        return (
            cm.configuration.get("resampling_fn_probabilities") == _DEFAULT_RESAMPLING
            and not predictor.label_manager.has_regions
            and int(kwargs.get("order", 1)) == 1
            and predictor.network is not None
        )

    def predict(
        self,
        data: np.ndarray,
        spacing: Sequence[float],
        *,
        tta: bool,
        keep_probabilities: bool,
        progress: Progress | None = None,
        probability_files: ProbabilityFiles | None = None,
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Labels (and probabilities) in nnU-Net's array order for ``data (C, Z, Y, X)`` of ``spacing`` (z, y, x).

        ``probability_files``: also write the probabilities into these files step by step; their ``grid_shape`` is
        the transposed (network-order) full image, ``props["shape_before_cropping"]``."""
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

        nn_ = self.nn
        pm, cm = nn_.plans_manager, nn_.configuration_manager
        preprocessor = cm.preprocessor_class(verbose=False)
        props: dict[str, Any] = {"spacing": list(spacing)}
        pre, _, props = preprocessor.run_case_npy(data, None, props, pm, cm, nn_.dataset_json)
        x = torch.from_numpy(np.ascontiguousarray(pre, dtype=np.float32))
        del pre
        trim_heap()  # the preprocessor's temporaries
        settings = EngineSettings(
            roi_size=self.roi,
            overlap=1.0 - self.step,
            batch_size=1,
            mirrors=mirror_subsets(self.mirror_axes) if tta and self.mirror_axes else ((),),
            accumulate="float16",
        )
        cropped = tuple(int(s) for s in props["shape_after_cropping_and_before_resampling"])
        full = tuple(int(s) for s in props["shape_before_cropping"])
        bbox = props["bbox_used_for_cropping"]
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        current = list(cm.spacing) if len(cm.spacing) == len(cropped) else [spacing_t[0], *cm.spacing]
        kwargs = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
        nearest: tuple[int, ...] = ()
        if tuple(x.shape[1:]) != cropped:
            separate, axis = determine_do_sep_z_and_axis(
                kwargs.get("force_separate_z"),
                current,
                spacing_t,
                kwargs.get("separate_z_anisotropy_threshold", 3),
            )
            if separate and axis is not None and int(kwargs.get("order_z", 0)) == 0:
                nearest = (int(axis),)
        grid = GridMap.resize(
            tuple(x.shape[1:]),
            cropped,
            offset=[int(b[0]) for b in bbox],
            full_shape=full,
            nearest_axes=nearest,
        )
        sink = LabelSink(
            grid,
            nn_.label_manager.num_segmentation_heads,
            keep_probabilities=keep_probabilities,
            probability_files=probability_files,
        )
        chunks = stream_logits(
            self.backend,
            x,
            settings,
            progress=progress,
            importance_map=self._importance(),
            half_weights=True,
        )
        for axis_, start, logits in chunks:
            sink.consume(axis_, start, logits)
        labels = sink.finish().transpose(pm.transpose_backward)
        probs = sink.probabilities
        if probs is not None:
            probs = probs.permute(0, *[i + 1 for i in pm.transpose_backward])
        return np.ascontiguousarray(labels), probs
