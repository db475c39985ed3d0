"""Openers: turn a folder on disk into a :class:`~medseg.inference.contract.SegmentationPredictor`.

Each kind of model folder has one opener: a ``detect(folder) -> bool`` test, an ``open(folder, *, device,
**options)`` builder and a line describing the layout for error messages. medseg's own run directories register
here; integrations register theirs (the nnU-Net integration registers ``nnunet`` for results folders), so this
module never imports them. :func:`medseg.open_predictor` is the public entry point: it makes sure the integrations
have registered before it asks the openers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.core.config import load_config
from medseg.core.errors import ConfigError
from medseg.core.registry import Registry
from medseg.inference.contract import SegmentationPredictor
from medseg.inference.rundir import RunDir, load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["Opener", "find_opener", "is_model_folder", "open_registered", "open_run_dir", "register_opener"]


@dataclass(frozen=True)
class Opener:
    """How one kind of model folder is recognised and opened.

    Attributes:
        name: short name (``run``, ``nnunet``).
        detect: ``detect(folder) -> bool``, cheap (file tests only).
        open: ``open(folder, *, device="auto", **options) -> SegmentationPredictor``.
        layout: what such a folder holds, for messages.
    """

    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., SegmentationPredictor]
    layout: str

    def options(self) -> list[str]:
        """Keyword options ``open`` accepts besides ``device``."""
        params = inspect.signature(self.open).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "device"]


OPENERS: Registry[Opener] = Registry("model folder opener")


def register_opener(
    name: str, detect: Callable[[Path], bool], open: Callable[..., SegmentationPredictor], layout: str
) -> None:
    """Register an opener (a duplicate name raises ``ConfigError``)."""
    OPENERS.add(name, Opener(name, detect, open, layout))


def find_opener(folder: Path) -> Opener | None:
    """The first registered opener that recognises ``folder`` (registration order), else ``None``."""
    for opener in OPENERS.values():  # registration order: medseg's own run directories first
        if opener.detect(folder):
            return opener
    return None


def is_model_folder(folder: Path) -> bool:
    """Whether some registered opener recognises ``folder``."""
    return folder.is_dir() and find_opener(folder) is not None


def open_registered(path: str | Path, *, device: str = "auto", **options: Any) -> SegmentationPredictor:
    """Open ``path`` with the opener that recognises it.

    Args:
        path: a model folder (run directory, nnU-Net results folder, ...).
        device: ``auto``, ``cpu`` or ``cuda``.
        **options: the opener's own options (a run directory: ``checkpoint``; nnU-Net: ``fold``, ``checkpoint``,
            ``tta``, ``tile_step_size``).

    Raises:
        ConfigError: the folder does not exist, no opener recognises it, or an option is not the opener's.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"model folder {root} does not exist",
            expected=_layouts(),
            hint="pass the folder `medseg train` (or nnU-Net) wrote",
            path=root,
        )
    opener = find_opener(root)
    if opener is None:
        raise ConfigError(
            f"{root} is not a model folder medseg can open",
            expected=_layouts(),
            hint="pass the folder `medseg train` (or nnU-Net) wrote, not a checkpoint file or a dataset",
            path=root,
        )
    unknown = sorted(set(options) - set(opener.options()))
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} do not apply to a {opener.name} folder ({root})",
            expected=f"one of {opener.options()}",
            path=root,
        )
    logger.debug("opening %s as a %s folder", root, opener.name)
    return opener.open(root, device=device, **options)


def _layouts() -> str:
    return "; or ".join(opener.layout for opener in OPENERS.values())


# ------------------------------------------------------------------------------------------ medseg run directories


def _is_run_dir(folder: Path) -> bool:
    return RunDir(folder).config.is_file()


def open_run_dir(
    root: Path,
    *,
    device: str = "auto",
    checkpoint: str = "best",
    backend: str | None = None,
    precision: str | None = None,
    tta_axes: str | Sequence[int] | None = None,
) -> SegmentationPredictor:
    """Rebuild model, preprocessing and window settings from a run directory (``config.yaml`` + checkpoint).

    A model whose card ``needs_prompts`` (DB-SAM, SAM-UNet) gets a
    :class:`~medseg.inference.prompted.PromptPredictor`, a classifier (``card.task == "classification"``, MedViTV2) a
    :class:`~medseg.inference.classify.ClassificationPredictor`, the others a
    :class:`~medseg.inference.predictor.Predictor`.

    Args:
        root: a run directory written by ``medseg train``.
        device: ``auto``, ``cpu`` or ``cuda``.
        checkpoint: ``best`` or ``last``.
        backend: override ``infer.backend`` (``torch`` or ``openvino``; dense models).
        precision: override ``infer.precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``; dense models).
        tta_axes: override ``infer.tta_axes`` (``"x,z"``, ``"0,2"``, ``[0, 2]`` or ``"all"``; see
            :func:`medseg.inference.engine.parse_mirror_axes`; dense models).

    Raises:
        ConfigError: not a run directory, an unknown ``checkpoint``, or a backend/precision/mirror axes this machine
            or model cannot run.
        WeightsError: the checkpoint is missing, unreadable or does not fit the network.
    """
    from medseg.inference.predictor import Predictor
    from medseg.inference.prompted import PromptPredictor
    from medseg.models import ModelCard, create_model
    from medseg.models.checkpoint import load_state_dict_checked

    rd = RunDir(Path(root))
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
    if model.card.needs_prompts or model.card.task == "classification":  # type: ignore[union-attr]
        if backend is not None or precision is not None or tta_axes is not None:
            raise ConfigError(
                "backend, precision and mirror axes apply to dense models only",
                hint="drop --backend / --precision / --tta-axes here",
            )
        if model.card.task == "classification":  # type: ignore[union-attr]
            from medseg.inference.classify import ClassificationPredictor

            return ClassificationPredictor(model, config, device=device)
        return PromptPredictor(model, config, device=device)
    changes: dict[str, Any] = {k: v for k, v in (("backend", backend), ("precision", precision)) if v is not None}
    axes: tuple[int, ...] | None = None
    if tta_axes is not None:
        from medseg.inference.engine import parse_mirror_axes

        axes = parse_mirror_axes(tta_axes)
        changes["tta_axes"] = list(axes) if axes is not None else None
    if changes:
        config = config.updated({"infer": changes})
    if tta_axes is not None and axes is None:  # "all" (``updated`` skips None values)
        config = config.model_copy(update={"infer": config.infer.model_copy(update={"tta_axes": None})})
    return Predictor(model, config, device=device, cache_dir=rd.root / "cache")


register_opener(
    "run",
    _is_run_dir,
    open_run_dir,
    "a medseg run directory (config.yaml, card.json, checkpoints/{best,last}.pt)",
)
