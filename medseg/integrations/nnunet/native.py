"""nnU-Net's own command lines (``nnUNetv2_train``, ``nnUNetv2_predict``) with medseg's STU-Net trainers visible.

Two ways to reach the trainers from nnU-Net's commands, neither copying files into site-packages:

1. Plain nnU-Net: ``export nnUNet_extTrainer="$(medseg nnunet trainer-path)"`` and run ``nnUNetv2_train ... -tr
   STUNetTrainer_small``. This needs a torchvision that imports with the installed torch: nnU-Net imports every
   trainer module (Primus -> timm -> torchvision) before it looks in ``nnUNet_extTrainer``, and a CUDA torchvision
   wheel next to the CPU torch fails there (see :mod:`medseg.integrations.nnunet.shim`).
2. Through medseg: ``medseg nnunet train-native 501 3d_fullres 0 -tr STUNetTrainer_small`` (and ``predict-native``)
   applies the torchvision shim, adds the trainer folder to ``nnUNet_extTrainer`` for this process only, and hands
   the arguments unchanged to nnU-Net's entry point. It works in any environment; ``nnUNet_raw`` /
   ``nnUNet_preprocessed`` / ``nnUNet_results`` are still read from the environment, as nnU-Net's commands do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from medseg.integrations.nnunet.shim import ensure_nnunet_importable

__all__ = ["expose_medseg_trainers", "nnunet_predict_main", "nnunet_train_main"]


def expose_medseg_trainers() -> None:
    """Apply the shim and put medseg's trainer folder first in this process's ``nnUNet_extTrainer`` (idempotent)."""
    from medseg.integrations.nnunet import TRAINER_DIR

    ensure_nnunet_importable()
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(TRAINER_DIR) not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([str(TRAINER_DIR), *paths])


def nnunet_train_main(argv: Sequence[str] | None = None) -> None:
    """``nnUNetv2_train`` with medseg's trainers visible; ``argv`` are its arguments (default: ``sys.argv[1:]``)."""
    expose_medseg_trainers()
    from nnunetv2.run.run_training import run_training_entry

    _run("nnUNetv2_train", run_training_entry, argv)


def nnunet_predict_main(argv: Sequence[str] | None = None) -> None:
    """``nnUNetv2_predict`` with medseg's trainers visible; ``argv`` are its arguments (default: ``sys.argv[1:]``)."""
    expose_medseg_trainers()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    _run("nnUNetv2_predict", predict_entry_point, argv)


def _run(program: str, entry: Callable[[], object], argv: Sequence[str] | None) -> None:
    saved = sys.argv
    sys.argv = [program, *(sys.argv[1:] if argv is None else argv)]
    try:
        entry()
    finally:
        sys.argv = saved
