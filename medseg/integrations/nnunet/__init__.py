"""nnU-Net v2 integration: export datasets, train STU-Net (or nnU-Net) with nnU-Net, predict from nnU-Net results.

Four pieces, each usable alone (nnunetv2 2.8.x is an optional dependency, imported only when needed):

* :func:`export_nnunet_raw` writes any medseg-readable dataset as nnU-Net raw data (``DatasetXXX_Name/`` with
  ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/``, ``imagesTs/``, ``dataset.json``), geometry untouched.
* :mod:`~medseg.integrations.nnunet.trainers`: ``STUNetTrainer_small|base|large|huge`` (+ ``_ft`` variants with lr
  1e-3) for nnunetv2 2.8, building :class:`medseg.models.stunet.STUNet` from the plans. ``nnUNetv2_train`` finds
  them through nnU-Net's own ``nnUNet_extTrainer`` lookup: ``export nnUNet_extTrainer="$(medseg nnunet
  trainer-path)"`` (:data:`TRAINER_DIR`); no file is copied into site-packages. ``medseg nnunet train-native`` /
  ``predict-native`` (:mod:`~medseg.integrations.nnunet.native`) run nnU-Net's commands with them visible.
* :func:`run_nnunet` runs export -> fingerprint/plan/preprocess -> train -> validation through nnunetv2's Python
  API, with the nnU-Net folders under one work directory and no environment variable for the user to set.
* :class:`NnUNetResultsPredictor` loads any nnU-Net v2 results folder (``plans.json``, ``dataset.json``,
  ``fold_X/checkpoint_*.pth``) and predicts with nnU-Net's pipeline behind medseg's predictor contract
  (:class:`~medseg.inference.contract.SegmentationPredictor`); :mod:`~medseg.integrations.nnunet.opener` registers
  it, so :func:`medseg.open_predictor` opens such folders.

Before any nnunetv2 import, :func:`ensure_nnunet_importable` makes torchvision importable next to the CPU torch
(see :mod:`~medseg.integrations.nnunet.shim`).

Examples::

    >>> from medseg.integrations.nnunet import run_nnunet, NnUNetResultsPredictor, NnUNetRunSettings
    >>> folder = run_nnunet("Task04_Hippocampus", "work", model="stunet_s", epochs=100)
    >>> result = NnUNetResultsPredictor.from_folder(folder, fold=0).predict("hippocampus_001.nii.gz")
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

#: Folder to list in ``nnUNet_extTrainer`` so that ``nnUNetv2_train -tr STUNetTrainer_*`` finds medseg's trainers.
TRAINER_DIR: Path = Path(__file__).resolve().parent / "nnunet_trainers"

_LAZY = {
    "ensure_nnunet_importable": "medseg.integrations.nnunet.shim",
    "export_nnunet_raw": "medseg.integrations.nnunet.export",
    "dataset_folder_name": "medseg.integrations.nnunet.export",
    "run_nnunet": "medseg.integrations.nnunet.runner",
    "NnUNetRunSettings": "medseg.integrations.nnunet.runner",
    "MODEL_TRAINERS": "medseg.integrations.nnunet.runner",
    "nnunet_paths": "medseg.integrations.nnunet.runner",
    "NnUNetResultsPredictor": "medseg.integrations.nnunet.results",
    "find_trainer_class": "medseg.integrations.nnunet.trainers",
    "nnunet_train_main": "medseg.integrations.nnunet.native",
    "nnunet_predict_main": "medseg.integrations.nnunet.native",
}

__all__ = ["TRAINER_DIR", *_LAZY]


def __getattr__(name: str) -> Any:
    # Lazy: importing this package must not import torch, MONAI or nnunetv2 (the CLI and `--help` stay fast).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg.integrations.nnunet' has no attribute {name!r}")
