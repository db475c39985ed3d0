"""Predict with any nnU-Net v2 results folder through medseg's predictor contract (``SegmentationPredictor``).

A results folder is what ``nnUNetv2_train`` (or :func:`medseg.integrations.nnunet.run_nnunet`) writes:
``{Trainer}__{Plans}__{configuration}/`` with ``plans.json``, ``dataset.json`` and ``fold_X/checkpoint_*.pth``.
:class:`NnUNetResultsPredictor` rebuilds the network from it and predicts with nnU-Net's own preprocessing, sliding
window (Gaussian, step 0.5, optional mirroring) and resampling back (``nnUNetPredictor``), so its masks equal those
of ``nnUNetv2_predict`` for the same image.

It mirrors what ``nnUNetPredictor.initialize_from_trained_model_folder`` does, with three differences:
checkpoints are read with ``torch.load(weights_only=True)`` (numpy scalars allowed) instead of full unpickling;
medseg's STU-Net trainers are found without the ``nnUNet_extTrainer`` variable; and every missing file or key is a
:class:`~medseg.core.errors.MedsegError` naming it.

Axis and spacing conventions: medseg images are ``(C, X, Y, Z)`` in the file's storage order with a RAS affine.
nnU-Net's default reader (SimpleITK, also its plain nibabel reader) gives arrays ``(C, Z, Y, X)`` of the same
storage order and the spacing reversed, ``(sz, sy, sx)``. The image is therefore transposed, its spacing taken from
the affine's column norms and reversed, and the mask transposed back onto the input's grid; nothing is resampled
by medseg. ``NibabelIOWithReorient`` plans (images reoriented to RAS first) are handled by reorienting likewise
and undoing it on the outputs.
"""

from __future__ import annotations

import inspect
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.core.device import pick_device
from medseg.core.errors import ConfigError, WeightsError
from medseg.inference.contract import Progress, SegmentationPredictor
from medseg.inference.gridmap import ProbabilityFiles, ProbabilityOutput
from medseg.inference.prediction import Prediction
from medseg.inference.prompts import Prompts
from medseg.integrations.nnunet.engine import NnUNetEngine
from medseg.integrations.nnunet.shim import ensure_nnunet_importable
from medseg.io import load_image, spacing_from_affine
from medseg.models import ModelCard
from medseg.models.checkpoint import load_state_dict_checked, numpy_safe_globals

logger = logging.getLogger(__name__)

__all__ = ["NnUNetResultsPredictor"]

_LAYOUT = "plans.json, dataset.json and fold_X/checkpoint_final.pth (an nnU-Net v2 results folder)"
_PAPER = "Isensee et al., nnU-Net, Nature Methods 18 (2021); arXiv:1809.10486"


class NnUNetResultsPredictor(SegmentationPredictor):
    """Segment images with a trained nnU-Net v2 model, behind medseg's predictor contract.

    Build it with :meth:`from_folder` (or :func:`medseg.open_predictor` on the folder).

    Attributes:
        card: a :class:`ModelCard` describing the model (channels, label names, ``roi_size`` = patch size in
            medseg's ``(X, Y, Z)`` order, target spacing, parameter count).
        folder: the results folder.
        tta: default for mirroring test-time augmentation (nnU-Net's default is on; it costs 8x in 3D).

    Examples::

        >>> folder = "nnUNet_results/Dataset501_X/nnUNetTrainer__nnUNetPlans__3d_fullres"
        >>> predictor = NnUNetResultsPredictor.from_folder(folder, fold=0)
        >>> result = predictor.predict("case.nii.gz", tta=False)
        >>> save_mask(result.mask, result.image, "case_mask.nii.gz")
    """

    def __init__(
        self, predictor: Any, card: ModelCard, folder: Path, *, tta: bool = True, engine: NnUNetEngine | None = None
    ) -> None:
        self._predictor = predictor
        self.card = card
        self.folder = folder
        self.tta = tta
        self.engine = engine
        self._reader = predictor.plans_manager.image_reader_writer_class.__name__

    @property
    def tta_default(self) -> bool:
        """Mirroring test-time augmentation when ``predict`` is not told otherwise."""
        return bool(self.tta)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        fold: int | str | Sequence[int | str] = 0,
        checkpoint: str = "checkpoint_final.pth",
        *,
        device: str = "auto",
        tta: bool = True,
        tile_step_size: float = 0.5,
        precision: str = "auto",
        backend: str = "torch",
        engine: bool = True,
        tta_axes: str | Sequence[int] | None = None,
    ) -> NnUNetResultsPredictor:
        """Load an nnU-Net v2 results folder (any trainer; medseg's STU-Net trainers included).

        Args:
            folder: the ``{Trainer}__{Plans}__{configuration}`` folder.
            fold: a fold (``0``..``4`` or ``"all"``), or several to ensemble (their softmax outputs are averaged).
            checkpoint: checkpoint file name inside ``fold_X/`` (``checkpoint_final.pth``, ``checkpoint_best.pth``).
            device: ``auto``, ``cpu`` or ``cuda``.
            tta: default mirroring test-time augmentation (overridable per :meth:`predict` call).
            tile_step_size: sliding-window step as a fraction of the patch (nnU-Net's default 0.5).
            precision: network precision (``auto``, ``fp32``, ``bf16``, ``fp16``; see
                :class:`medseg.inference.backends.Backend`).
            backend: ``torch`` or ``openvino``.
            engine: run windows and export through medseg's engine (memory-bounded, same masks); ``False``:
                ``nnUNetPredictor`` end to end.
            tta_axes: mirror only these voxel axes of the input (``"x"``, ``"x,z"``, ``[0, 2]``: the first, second,
                third axis of the image as loaded, the first being left-right in the usual axial storage); ``None``
                or ``"all"``: every axis the checkpoint allows (nnU-Net's 8 passes in 3D).

        Raises:
            ConfigError: the folder, ``plans.json`` or ``dataset.json`` is missing or unreadable, the configuration
                is not in the plans, or the trainer class is unknown.
            WeightsError: a fold folder or checkpoint is missing, unreadable, or does not fit the network.
        """
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"nnU-Net results folder {root} does not exist", expected=_LAYOUT, path=root)
        plans = _read_json(root / "plans.json")
        dataset_json = _read_json(root / "dataset.json")
        folds = [fold] if isinstance(fold, int | str) else list(fold)
        if not folds:
            raise ConfigError("no fold given", expected="a fold such as 0 or 'all', or a list of folds")
        checkpoints = [_load_checkpoint(root, f, checkpoint) for f in folds]
        first = checkpoints[0]
        trainer_name, configuration = first["trainer_name"], first["init_args"]["configuration"]

        # Files are checked first, so that a bad folder fails fast without importing nnunetv2.
        ensure_nnunet_importable()
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from medseg.integrations.nnunet.trainers import find_trainer_class

        plans_manager = PlansManager(plans)
        if configuration not in plans_manager.available_configurations:
            raise ConfigError(
                f"{root / 'plans.json'} has no configuration {configuration!r} (the checkpoint was trained with it)",
                expected=f"one of {plans_manager.available_configurations}",
                path=root / "plans.json",
            )
        configuration_manager = plans_manager.get_configuration(configuration)
        if configuration_manager.previous_stage_name is not None:
            raise ConfigError(
                f"{root.name} is a cascade stage (it needs the {configuration_manager.previous_stage_name!r} "
                "prediction as input), which medseg does not chain",
                expected="a single-stage configuration (2d, 3d_fullres, 3d_lowres)",
                hint="predict the cascade with nnUNetv2_predict (medseg nnunet predict-native)",
                path=root,
            )
        label_manager = plans_manager.get_label_manager(dataset_json)
        num_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        num_out = label_manager.num_segmentation_heads
        trainer_class = find_trainer_class(trainer_name)
        network = _build_network(trainer_class, plans_manager, configuration_manager, num_in, num_out)
        for f, ckpt in zip(folds, checkpoints, strict=True):
            try:
                load_state_dict_checked(network, ckpt["network_weights"], source=str(root / f"fold_{f}" / checkpoint))
            except WeightsError as err:
                raise WeightsError(
                    err.what,
                    expected=err.expected,
                    hint=f"the checkpoint was trained with other plans.json / dataset.json than those in {root}",
                    path=root / f"fold_{f}" / checkpoint,
                ) from None

        torch_device = pick_device(device)
        predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=torch_device.type == "cuda",
            device=torch_device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            network.to(torch_device),
            plans_manager,
            configuration_manager,
            [c["network_weights"] for c in checkpoints],
            dataset_json,
            trainer_name,
            first.get("inference_allowed_mirroring_axes"),
        )
        if tta_axes is not None:
            predictor.allowed_mirroring_axes = _network_mirror_axes(
                tta_axes,
                plans_manager.transpose_forward,
                predictor.allowed_mirroring_axes,
                len(configuration_manager.patch_size),
            )
        card = _card(root, plans_manager, configuration_manager, label_manager, dataset_json, network, num_in, num_out)
        card = card.replace(paper=_paper(trainer_name))
        logger.info("loaded nnU-Net model %s (trainer %s, folds %s) from %s", card.name, trainer_name, folds, root)
        fast = None
        if engine and NnUNetEngine.supported(predictor):
            fast = NnUNetEngine(
                predictor,
                torch_device,
                in_channels=int(num_in),
                tile_step_size=tile_step_size,
                precision=precision,
                backend=backend,
                cache_dir=root / "cache",
            )
        elif backend != "torch" or precision not in ("auto", "fp32"):
            raise ConfigError(
                f"backend {backend!r} / precision {precision!r} need medseg's engine, which these plans cannot use "
                "(region labels or a non-default resampling)",
                expected="backend torch, precision auto",
            )
        return cls(predictor, card, root, tta=tta, engine=fast)

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
        """Segment one image with nnU-Net's pipeline; the mask lies on the input's exact voxel grid.

        Args:
            image: a path readable by :func:`medseg.io.load_image` or a loaded ``MetaTensor (C, X, Y, Z)``.
            prompts: must be ``None`` (nnU-Net models take no prompts).
            tta: mirroring test-time augmentation (default: the predictor's ``tta``).
            keep_probabilities: also return the class probabilities ``(C_out, X, Y, Z)`` on the input grid.
            progress: called with ``(windows_done, windows_total)`` (engine path only).
            probabilities_out: write the probabilities on the input grid to these files step by step
                (:class:`~medseg.inference.gridmap.ProbabilityFiles`), never holding all classes at full size
                (engine path only).

        Returns:
            A :class:`~medseg.inference.Prediction` (mask ``(X, Y, Z)`` with the input's affine).

        Raises:
            ModelInputError: the image has the wrong number of channels or is not 3D.
            ConfigError: ``probabilities_out`` without medseg's engine (``engine=False`` or plans it cannot run).
        """
        self.check_prompts(prompts)
        if probabilities_out is not None and self.engine is None:
            raise ConfigError(
                "probabilities are written to files by medseg's engine, which this predictor does not use",
                expected="an nnU-Net folder opened with engine=True (plans with nnU-Net's default resampling)",
                hint="keep_probabilities=True returns them in memory instead",
            )
        original = image if isinstance(image, MetaTensor) else load_image(image)
        self.check_image(original)
        data, spacing, undo = self._to_nnunet(original)
        mirror = self.tta if tta is None else tta
        probabilities = None
        if self.engine is not None:
            files = None
            if probabilities_out is not None:
                affine = np.asarray(original.affine, dtype=np.float64)
                shape = original.shape[1:]
                files = ProbabilityFiles(
                    probabilities_out, shape, affine, self.label_names, view=self._grid_view(affine)
                )
            seg, probs = self.engine.predict(
                data,
                spacing,
                tta=mirror,
                keep_probabilities=keep_probabilities,
                progress=progress,
                probability_files=files,
            )
            if files is not None:  # only a finished prediction gets its <prefix>.json (as run directories do)
                files.close()
            labels = torch.from_numpy(np.ascontiguousarray(undo(seg[None])[0]))
            if probs is not None:
                probabilities = torch.from_numpy(np.ascontiguousarray(undo(probs.numpy())))
        else:
            self._predictor.use_mirroring = mirror
            out = self._predictor.predict_single_npy_array(data, {"spacing": spacing}, None, None, keep_probabilities)
            seg = out[0] if keep_probabilities else out
            labels = torch.from_numpy(np.ascontiguousarray(undo(np.asarray(seg)[None])[0]))
            if keep_probabilities:
                probabilities = torch.from_numpy(np.ascontiguousarray(undo(np.asarray(out[1]))))
        return Prediction.on_input_grid(labels, original, self.label_names, probabilities)

    def _grid_view(self, affine: np.ndarray) -> Any:
        """A function viewing an ``(X, Y, Z)`` array on the input grid in the engine's order: reoriented as
        :meth:`_to_nnunet` reorients, reversed to nnU-Net's ``(z, y, x)``, then transposed by ``transpose_forward``
        (numpy views: transposes and reversed strides only)."""
        order = [int(t) for t in self._predictor.plans_manager.transpose_forward]
        ornt = None
        if self._reader == "NibabelIOWithReorient":
            from nibabel.orientations import io_orientation

            ornt = io_orientation(affine)

        def view(array: np.ndarray) -> np.ndarray:
            if ornt is not None:
                from nibabel.orientations import apply_orientation

                array = apply_orientation(array, ornt)
            return array.transpose(2, 1, 0).transpose(order)

        return view

    def _to_nnunet(self, image: MetaTensor) -> tuple[np.ndarray, list[float], Any]:
        """``(C, X, Y, Z)`` -> nnU-Net's ``(C, Z, Y, X)`` array, its spacing, and the inverse for outputs."""
        data = image.detach().cpu().numpy().astype(np.float32, copy=False)
        affine = np.asarray(image.affine, dtype=np.float64)
        from_canonical = None
        spacing_xyz = spacing_from_affine(affine)
        if self._reader == "NibabelIOWithReorient":  # nnU-Net reoriented the training images to RAS first
            to_canonical, from_canonical, spacing_xyz = _canonical_orientation(affine)
            data = to_canonical(data)
        spacing = [float(s) for s in spacing_xyz[::-1]]

        def undo(out: np.ndarray) -> np.ndarray:
            out = np.transpose(out, (0, 3, 2, 1))
            return from_canonical(out) if from_canonical is not None else out

        return np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1))), spacing, undo


# ----------------------------------------------------------------------------------------------------- helpers


def _network_mirror_axes(
    tta_axes: str | Sequence[int],
    transpose_forward: Sequence[int],
    allowed: Sequence[int] | None,
    patch_dims: int,
) -> tuple[int, ...] | None:
    """nnU-Net's mirror axes (of the preprocessed array the network sees) for ``tta_axes`` named on medseg's
    ``(X, Y, Z)`` voxel axes: voxel axis ``a`` is nnU-Net's array axis ``2 - a`` before ``transpose_forward``.

    Raises:
        ConfigError: an axis the checkpoint does not mirror (nnU-Net leaves out the slice axis of anisotropic and
            2D configurations), or an unparsable value.
    """
    from medseg.inference.engine import parse_mirror_axes

    voxel_axes = parse_mirror_axes(tta_axes)
    if voxel_axes is None:
        return tuple(allowed) if allowed is not None else None
    order = [int(t) for t in transpose_forward]
    offset = 3 - patch_dims  # a 2D configuration's network axes start after the slice axis
    allowed_set = set(range(patch_dims) if allowed is None else (int(a) for a in allowed))
    names = "xyz"
    mapped = []
    for a in voxel_axes:
        network_axis = order.index(2 - a) - offset
        if network_axis not in allowed_set:
            can = sorted(names[2 - order[n + offset]] for n in allowed_set)
            raise ConfigError(
                f"--tta-axes: this model does not mirror the {names[a]} axis",
                expected=f"axes among {', '.join(can)} (those its checkpoint allows), or all",
                hint="leave out --tta-axes to mirror every allowed axis",
            )
        mapped.append(network_axis)
    return tuple(sorted(mapped))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        raise ConfigError(
            f"{path.name} not found in {path.parent}",
            expected=_LAYOUT,
            hint="pass the {Trainer}__{Plans}__{configuration} folder nnU-Net wrote, not a fold or dataset folder",
            path=path,
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path} ({err})", expected="a JSON object", path=path) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}", expected="a JSON object", path=path)
    return data


def _load_checkpoint(root: Path, fold: int | str, name: str) -> dict[str, Any]:
    fold_dir = root / f"fold_{fold}"
    if not fold_dir.is_dir():
        found = sorted(p.name for p in root.glob("fold_*") if p.is_dir())
        raise WeightsError(
            f"fold folder {fold_dir} not found",
            expected=f"fold_{fold}/ inside {root}",
            hint=f"available: {', '.join(found)}" if found else "this model has no trained fold yet",
            path=fold_dir,
        )
    path = fold_dir / name
    if not path.is_file():
        found = sorted(p.name for p in fold_dir.glob("checkpoint*.pth"))
        raise WeightsError(
            f"checkpoint {path} not found",
            expected=f"{name} in {fold_dir}",
            hint=f"available: {', '.join(found)}" if found else "the training of this fold did not save a checkpoint",
            path=path,
        )
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"cannot read {path} as a weights-only nnU-Net checkpoint ({first})",
            expected="a checkpoint written by nnU-Net v2 (network_weights, trainer_name, init_args)",
            path=path,
        ) from None
    missing = [
        k for k in ("network_weights", "trainer_name", "init_args") if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing or "configuration" not in ckpt["init_args"]:
        raise WeightsError(
            f"{path} is not an nnU-Net v2 checkpoint (missing {', '.join(missing) or 'init_args.configuration'})",
            expected="keys network_weights, trainer_name, init_args",
            path=path,
        )
    return ckpt


def _build_network(trainer_class: Any, plans_manager: Any, configuration_manager: Any, num_in: int, num_out: int):
    """The trainer's network for inference (no deep supervision), for the 2.8 and the deprecated signatures."""
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(
            plans_manager, configuration_manager, num_in, num_out, enable_deep_supervision=False
        )
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_in,
        num_out,
        enable_deep_supervision=False,
    )


def _medseg_axes(values: Sequence[float], transpose_forward: Sequence[int]) -> tuple[float, ...]:
    """nnU-Net per-axis values (after ``transpose_forward``, in ``(z, y, x)`` storage order) -> medseg ``(X, Y, Z)``."""
    storage = [0.0] * len(values)
    for i, axis in enumerate(transpose_forward):
        storage[axis] = values[i]
    return tuple(storage[::-1])


def _card(root, plans_manager, configuration_manager, label_manager, dataset_json, network, num_in, num_out):
    transpose = plans_manager.transpose_forward
    pools = np.vstack(configuration_manager.pool_op_kernel_sizes)
    divisible = _medseg_axes(list(np.prod(pools, axis=0)), transpose)
    labels = sorted(
        ((int(v) if not isinstance(v, list) else int(v[0]), str(k)) for k, v in dataset_json["labels"].items()),
        key=lambda item: item[0],
    )
    names = tuple(n for v, n in labels if v != label_manager.ignore_label)
    if not label_manager.has_regions and len(names) != num_out:
        names = tuple(names[:num_out]) + tuple(f"label_{i}" for i in range(len(names), num_out))
    schemes = configuration_manager.normalization_schemes
    return ModelCard(
        name=f"nnunet-{plans_manager.dataset_name}-{root.name}".lower().replace("__", "-"),
        task="segmentation",
        spatial_dims=len(configuration_manager.patch_size),
        in_channels=int(num_in),
        out_channels=int(num_out),
        roi_size=tuple(int(v) for v in _medseg_axes(configuration_manager.patch_size, transpose)),
        divisible_by=tuple(int(v) for v in divisible),
        target_spacing=tuple(float(v) for v in _medseg_axes(configuration_manager.spacing, transpose)),
        intensity_preset="ct" if any("CT" in s for s in schemes) else "zscore",
        label_names=names,
        reference_params=sum(p.numel() for p in network.parameters()),
        reference_config={"results_folder": str(root), "dataset": plans_manager.dataset_name},
    )


def _paper(trainer_name: str) -> str:
    if trainer_name.startswith("STUNetTrainer"):
        return f"{_PAPER}; Huang et al., STU-Net, arXiv:2304.06716"
    return _PAPER


def _canonical_orientation(affine: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """Reorient ``(C, X, Y, Z)`` arrays to the closest RAS axes and back (nibabel's ``as_closest_canonical``).

    Returns:
        ``to_canonical``, ``from_canonical`` and the voxel spacing along the canonical axes ``(3,)``.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)
    inverse = np.zeros_like(ornt)
    spacing = np.zeros(3)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
        spacing[int(target)] = spacing_from_affine(affine)[axis]

    def to_canonical(arr: np.ndarray) -> np.ndarray:
        return np.stack([apply_orientation(a, ornt) for a in arr])

    def from_canonical(arr: np.ndarray) -> np.ndarray:
        return np.stack([apply_orientation(a, inverse) for a in arr])

    return to_canonical, from_canonical, spacing
