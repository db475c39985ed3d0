"""The demo's real default data: brain-tissue "subjects" made from the MNI152 2009a template.

nilearn ships the ICBM152 2009a symmetric T1 template with grey- and white-matter probability maps (197×233×189,
1 mm). Each subject is the template seen through a random affine (rotation, anisotropic scaling, shift) and a
smooth random elastic displacement, resampled on a 1.5 mm grid around the brain, with a multiplicative bias field
and noise. The label is the argmax of (background, GM, WM) of the probability maps deformed with the same field,
so image and label stay aligned. Held-out subjects can be written in another voxel orientation so that the demo
also shows masks landing on the input's own grid.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medseg.core.errors import DataError

logger = logging.getLogger(__name__)

LABEL_NAMES = ("background", "gray_matter", "white_matter")
_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


@dataclass(frozen=True)
class SubjectSettings:
    """Random deformation strengths (defaults keep subjects anatomically plausible)."""

    spacing: float = 1.5
    max_rotation_deg: float = 10.0
    max_scale: float = 0.08
    max_shift_mm: float = 6.0
    elastic_mm: float = 3.0
    elastic_grid: int = 6
    bias_strength: float = 0.25
    noise: float = 0.02
    margin_mm: float = 6.0


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1, GM and WM maps inside the installed nilearn."""
    try:
        root = resources.files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError:
        raise DataError(
            "the demo needs nilearn's MNI152 template, but nilearn is not installed",
            hint="install the demo extra: pip install -e '.[demo]' (make demo does this)",
        ) from None
    paths = {k: Path(str(root / name)) for k, name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"nilearn is installed but lacks {missing}", hint="reinstall nilearn >= 0.10")
    return paths


class BrainTemplate:
    """The MNI T1 with its GM/WM probabilities, cropped to the brain."""

    def __init__(self, settings: SubjectSettings | None = None) -> None:
        self.settings = settings or SubjectSettings()
        paths = template_paths()
        images = {k: nib.load(p) for k, p in paths.items()}
        self.affine = images["t1"].affine
        self.t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
        self.gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
        self.wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0
        brain = (self.gm + self.wm) > 0.1
        idx = np.argwhere(brain)
        lo = self.affine[:3, :3] @ idx.min(0) + self.affine[:3, 3] - self.settings.margin_mm
        hi = self.affine[:3, :3] @ idx.max(0) + self.affine[:3, 3] + self.settings.margin_mm
        self.world_lo, self.world_hi = lo, hi  # RAS mm box around the brain

    def subject(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One random subject on a RAS grid of ``settings.spacing`` mm.

        Returns:
            ``(t1 (X, Y, Z) float32, label (X, Y, Z) uint8, affine (4, 4))``.
        """
        s = self.settings
        shape = np.ceil((self.world_hi - self.world_lo) / s.spacing).astype(int)
        affine = np.diag([s.spacing] * 3 + [1.0])
        affine[:3, 3] = self.world_lo
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
        world = grid * s.spacing + self.world_lo.astype(np.float32)
        centre = (self.world_lo + self.world_hi) / 2
        # Random affine about the brain centre: subject world → template world.
        angles = np.deg2rad(rng.uniform(-s.max_rotation_deg, s.max_rotation_deg, 3))
        rot = _rotation(angles) @ np.diag(1 + rng.uniform(-s.max_scale, s.max_scale, 3))
        shift = rng.uniform(-s.max_shift_mm, s.max_shift_mm, 3)
        warped = (world - centre) @ rot.T.astype(np.float32) + (centre + shift).astype(np.float32)
        warped += _smooth_field(rng, shape, s.elastic_grid, s.elastic_mm)
        vox = (warped - self.affine[:3, 3].astype(np.float32)) @ np.linalg.inv(self.affine[:3, :3]).T.astype(np.float32)
        coords = np.moveaxis(vox, -1, 0)
        sample = {
            k: ndimage.map_coordinates(getattr(self, k), coords, order=1, mode="constant") for k in ("t1", "gm", "wm")
        }
        probs = np.stack([np.clip(1 - sample["gm"] - sample["wm"], 0, 1), sample["gm"], sample["wm"]])
        label = probs.argmax(0).astype(np.uint8)
        bias = np.exp(_smooth_field(rng, shape, 3, s.bias_strength, channels=1)[..., 0])
        t1 = sample["t1"] * bias * rng.uniform(0.8, 1.2)
        t1 = t1 + rng.normal(0, s.noise * float(self.t1.max()), t1.shape).astype(np.float32)
        return np.clip(t1, 0, None).astype(np.float32), label, affine


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(
    rng: np.random.Generator, shape: np.ndarray, coarse: int, magnitude: float, channels: int = 3
) -> np.ndarray:
    """Random field ``(X, Y, Z, channels)``: normal values on a coarse grid, trilinearly upsampled to ``shape``."""
    field = torch.from_numpy(rng.normal(0, magnitude, (1, channels, coarse, coarse, coarse)).astype(np.float32))
    up = F.interpolate(field, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True)
    return np.moveaxis(up[0].numpy(), 0, -1)


def reorient_for_storage(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """Store a subject in LPS-like voxel order (flip X and Y): same world content, another voxel grid."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = image.shape[0] - 1, image.shape[1] - 1
    return image[::-1, ::-1].copy(), label[::-1, ::-1].copy(), affine @ flip


def write_demo_dataset(root: Path, n_train: int = 10, n_heldout: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Write an MSD-layout training set and a paired-layout held-out set under ``root``.

    Returns:
        ``(train_root, heldout_root)``; the training set has ``dataset.json`` (labels background / gray_matter /
        white_matter, modality MRI), the held-out set ``images/`` + ``labels/`` stored in flipped voxel order.
    """
    template = BrainTemplate()
    rng = np.random.default_rng(seed)
    train_root, heldout_root = root / "brain_train", root / "brain_heldout"
    for sub in ("imagesTr", "labelsTr"):
        (train_root / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels"):
        (heldout_root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_train + n_heldout):
        image, label, affine = template.subject(rng)
        case = f"brain_{i:03d}"
        if i < n_train:
            img_path, lbl_path = train_root / "imagesTr" / f"{case}.nii.gz", train_root / "labelsTr" / f"{case}.nii.gz"
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            image, label, affine = reorient_for_storage(image, label, affine)
            img_path, lbl_path = heldout_root / "images" / f"{case}.nii.gz", heldout_root / "labels" / f"{case}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), img_path)
        nib.save(nib.Nifti1Image(label, affine), lbl_path)
        logger.info("wrote subject %s %s", case, image.shape)
    meta = {
        "name": "MNI152 brain tissue (demo)",
        "description": "Deformed MNI152 2009a T1 subjects; labels = argmax(background, GM, WM)",
        "modality": {"0": "MRI"},
        "labels": {str(i): n for i, n in enumerate(LABEL_NAMES)},
        "numTraining": n_train,
        "training": training,
        "test": [],
    }
    (train_root / "dataset.json").write_text(json.dumps(meta, indent=2))
    (heldout_root / "dataset.json").write_text(
        json.dumps({"name": "MNI152 brain tissue, held out", "labels": meta["labels"], "modality": {"0": "MRI"}})
    )
    return train_root, heldout_root


def write_slice_dataset(
    root: Path, n_train: int = 8, n_heldout: int = 2, slices: int = 12, seed: int = 0
) -> tuple[Path, Path]:
    """Write a 2D brain-tissue task: axial slices of deformed MNI subjects as 8-bit PNG images and label masks.

    Slices are spread evenly over the middle 60 % of each subject's brain extent along its third axis. Intensities are
    scaled per subject to 0-255 at the 99.5th percentile (how a 2D export of an MRI looks). Both folders follow the
    2D paired layout (``images/`` + ``masks/`` + ``dataset.json``); the PNG rows run along the volume's second axis.

    Returns:
        ``(train_root, heldout_root)``.
    """
    from PIL import Image

    template = BrainTemplate()
    rng = np.random.default_rng(seed)
    roots = (root / "slices_train", root / "slices_heldout")
    meta = {
        "name": "MNI152 brain tissue, axial slices",
        "labels": {str(i): n for i, n in enumerate(LABEL_NAMES)},
        "modality": "MRI",
    }
    for r in roots:
        for sub in ("images", "masks"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "dataset.json").write_text(json.dumps(meta, indent=2))
    for i in range(n_train + n_heldout):
        image, label, _ = template.subject(rng)
        target = roots[0] if i < n_train else roots[1]
        z_with_brain = np.flatnonzero(label.any(axis=(0, 1)))
        lo, hi = np.percentile(z_with_brain, [20, 80])
        top = float(np.percentile(image[label > 0], 99.5))
        scaled = np.clip(image / top * 255.0, 0, 255).round().astype(np.uint8)
        for z in np.linspace(lo, hi, slices).round().astype(int):
            case = f"brain_{i:03d}_z{z:03d}"
            Image.fromarray(np.ascontiguousarray(scaled[:, :, z].T)).save(target / "images" / f"{case}.png")
            Image.fromarray(np.ascontiguousarray(label[:, :, z].T)).save(target / "masks" / f"{case}.png")
        logger.info("wrote %d slices of subject %d", slices, i)
    return roots
