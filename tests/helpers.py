"""Test data builders shared across test packages: a tiny labelled 3D dataset (non-identity affine), tiny configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from medseg.models import tiny_overrides

TINY_SHAPE = (32, 28, 36)


def tiny_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted RAS affine."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([1.2, 1.0, 1.5])[None, :]
    affine[:3, 3] = (-20.0, 15.0, 7.5)
    return affine


def make_case(rng: np.random.Generator, shape: tuple[int, int, int] = TINY_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright sphere (label 1) and a darker box (label 2) on noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    sphere = np.linalg.norm(grid - centre, axis=-1) < rng.uniform(5, 8)
    label = np.zeros(shape, np.uint8)
    lo = rng.integers(2, 6, 3)
    label[lo[0] : lo[0] + 6, lo[1] : lo[1] + 6, lo[2] : lo[2] + 6] = 2
    label[sphere] = 1
    image = rng.normal(0.0, 0.1, shape).astype(np.float32) + 0.2
    image[label == 1] += 1.0
    image[label == 2] += 0.5
    return image, label


def write_msd(root: Path, n_cases: int = 4, seed: int = 0) -> Path:
    """An MSD-layout dataset of ``n_cases`` tiny cases."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n_cases):
        image, label = make_case(rng)
        nib.save(nib.Nifti1Image(image, tiny_affine()), root / "imagesTr" / f"case_{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(label, tiny_affine()), root / "labelsTr" / f"case_{i:02d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    meta = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "sphere", "2": "box"},
        "numTraining": n_cases,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def tiny_config(path: Path, epochs: int = 2, model: str = "segformer3d", **train: object) -> Path:
    """A YAML config training the tiny variant of ``model`` for a few steps."""
    cfg = {
        "name": "tiny",
        "data": {"preset": "mri", "val_fraction": 0.25},
        "model": {"name": model, "roi_size": [32, 32, 32], "kwargs": tiny_overrides(model)},
        "train": {"epochs": epochs, "iters_per_epoch": 3, "batch_size": 2, "warmup_iters": 2, "val_every": 1, **train},
        "infer": {"overlap": 0.25, "sw_batch_size": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_shapes_dataset_2d(root: Path, n: int = 6, shape: tuple[int, int] = (40, 52), seed: int = 0) -> Path:
    """A 2D paired dataset (``images/*.png`` + ``masks/*.png``): a bright disc (label 1) and a grey square (label 2).

    PNG arrays are ``(rows, cols)`` = ``shape``; ``dataset.json`` names the labels ``disc`` and ``square``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        r0, c0 = rng.integers(4, 10, 2)
        label[r0 : r0 + 10, c0 : c0 + 10] = 2
        cr, cc = shape[0] * 0.6 + rng.uniform(-3, 3), shape[1] * 0.6 + rng.uniform(-3, 3)
        label[(rows - cr) ** 2 + (cols - cc) ** 2 < rng.uniform(5, 8) ** 2] = 1
        image = rng.normal(40, 8, shape) + 150.0 * (label == 1) + 80.0 * (label == 2)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"img_{i:02d}.png")
        Image.fromarray(label).save(root / "masks" / f"img_{i:02d}.png")
    (root / "dataset.json").write_text(
        json.dumps({"name": "shapes", "labels": {"0": "background", "1": "disc", "2": "square"}, "modality": "US"})
    )
    return root


def prompted_config(path: Path, model: str = "sam_unet_r34", epochs: int = 1, **train: object) -> Path:
    """A YAML config training the tiny variant of a prompted model for a few steps."""
    cfg = {
        "name": "tiny_prompted",
        "data": {"val_fraction": 0.34},
        "model": {"name": model, "kwargs": tiny_overrides(model)},
        "train": {"epochs": epochs, "iters_per_epoch": 3, "batch_size": 2, "warmup_iters": 1, "lr": 3e-4, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str]:
    """Run ``medseg ARGS`` in-process; returns the exit status and stdout + stderr."""
    import sys

    import pytest

    from pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["medseg", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out + captured.err
