"""BUSI and CAMUS folders: detected by the layout detector, converted to a paired folder, verified and trained on."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from medseg.core.errors import DataError
from medseg.data import load_manifest
from medseg.data.us_layouts import BUSI_LABELS, CACHE_FOLDER, CAMUS_LABELS, is_busi_dataset, is_camus_dataset
from medseg.io import load_image
from medseg.models import tiny_overrides
from tests.helpers import run_cli

H, W = 48, 64


def _scan(rng: np.random.Generator, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """A speckled grey scan with a dark (anechoic) lesion in ``box`` = (row0, row1, col0, col1)."""
    image = rng.rayleigh(60, (H, W))
    if box is not None:
        image[box[0] : box[1], box[2] : box[3]] *= 0.2
    return np.clip(image, 0, 255).astype(np.uint8)


def _mask(box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = 255
    return mask


def write_busi(root: Path, seed: int = 0) -> Path:
    """benign: 3 images (one with two lesions), malignant: 2, normal: one with an empty mask, one without."""
    rng = np.random.default_rng(seed)
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True)
    for k in range(1, 4):
        box = (5 + 3 * k, 20 + 3 * k, 10, 30)
        grey = _scan(rng, box)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "benign" / f"benign ({k}).png")  # RGB, grey
        Image.fromarray(_mask(box)).save(root / "benign" / f"benign ({k})_mask.png")
    second = (30, 40, 40, 56)
    Image.fromarray(_mask(second)).save(root / "benign" / "benign (1)_mask_1.png")
    for k in range(1, 3):
        box = (10, 35, 20 + 5 * k, 45 + 5 * k)
        Image.fromarray(_scan(rng, box)).save(root / "malignant" / f"malignant ({k}).png")
        Image.fromarray(np.stack([_mask(box)] * 3, axis=-1)).save(root / "malignant" / f"malignant ({k})_mask.png")
    Image.fromarray(_scan(rng, None)).save(root / "normal" / "normal (1).png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "normal" / "normal (1)_mask.png")
    Image.fromarray(_scan(rng, None)).save(root / "normal" / "normal (2).png")
    return root


def write_camus(root: Path, patients: int = 2, seed: int = 0) -> Path:
    """``patients`` patients x {2CH, 4CH} x {ED, ES}, 2D NIfTI (X, Y) with labels 1-3, plus a half sequence."""
    rng = np.random.default_rng(seed)
    affine = np.diag([0.31, 0.154, 1.0, 1.0])
    for p in range(1, patients + 1):
        folder = root / f"patient{p:04d}"
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            for phase in ("ED", "ES"):
                gt = np.zeros((W, H), dtype=np.uint8)
                shrink = 2 if phase == "ES" else 0
                gt[18 : 46 - shrink, 8 : 30 - shrink] = 2  # myocardium around the cavity
                gt[22 : 42 - shrink, 10 : 26 - shrink] = 1
                gt[24:40, 32:44] = 3  # left atrium
                image = rng.rayleigh(50, gt.shape) * np.where(gt == 2, 2.0, np.where(gt > 0, 0.3, 1.0))
                stem = f"patient{p:04d}_{view}_{phase}"
                nib.save(nib.Nifti1Image(np.clip(image, 0, 255).astype(np.uint8), affine), folder / f"{stem}.nii.gz")
                nib.save(nib.Nifti1Image(gt, affine), folder / f"{stem}_gt.nii.gz")
        cine = rng.integers(0, 255, (W, H, 5), dtype=np.uint8)
        nib.save(nib.Nifti1Image(cine, affine), folder / f"patient{p:04d}_4CH_half_sequence.nii.gz")
    return root


def test_busi_masks_are_merged_by_union(tmp_path: Path) -> None:
    root = write_busi(tmp_path / "Dataset_BUSI_with_GT")
    assert is_busi_dataset(root) and not is_camus_dataset(root)
    manifest = load_manifest(root)
    assert manifest.layout == "paired" and manifest.label_names == BUSI_LABELS and manifest.modality == "US"
    ids = [c.case_id for c in manifest.cases]
    assert ids == ["benign_1", "benign_2", "benign_3", "malignant_1", "malignant_2", "normal_1", "normal_2"]
    assert manifest.root.parent == root / CACHE_FOLDER
    masks = {c.case_id: np.asarray(Image.open(c.label)) for c in manifest.cases}
    expected = (_mask((8, 23, 10, 30)) | _mask((30, 40, 40, 56))) // 255  # the union of both lesions
    np.testing.assert_array_equal(masks["benign_1"], expected)
    np.testing.assert_array_equal(masks["malignant_2"], _mask((10, 35, 30, 55)) // 255)  # an RGB mask
    assert not masks["normal_1"].any() and not masks["normal_2"].any()  # empty mask / no mask: all zero
    grey = np.asarray(Image.open(manifest.cases[0].images[0]))
    assert grey.shape == (H, W)  # RGB of equal channels written as one grey channel
    assert load_image(manifest.cases[0].images[0]).shape[0] == 1
    # the conversion is reused, and done again when a file changes
    assert load_manifest(root).root == manifest.root
    stamp = (root / "normal" / "normal (2).png").stat().st_mtime_ns + 10**9
    os.utime(root / "normal" / "normal (2).png", ns=(stamp, stamp))
    assert load_manifest(root).root != manifest.root


def test_busi_problems_are_refused(tmp_path: Path) -> None:
    root = write_busi(tmp_path / "a")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "malignant" / "malignant (1)_mask_1.png")
    with pytest.raises(DataError, match=r"malignant \(1\)_mask_1.png is 64 x 49"):
        load_manifest(root)
    other = write_busi(tmp_path / "b")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(other / "benign" / "benign (9)_mask.png")
    with pytest.raises(DataError, match="masks without their image"):
        load_manifest(other)
    assert not list((other / CACHE_FOLDER).glob(".partial-*"))  # nothing half-written is left


def test_camus_views_with_their_references(tmp_path: Path) -> None:
    root = write_camus(tmp_path / "CAMUS")
    assert is_camus_dataset(root) and not is_busi_dataset(root)
    manifest = load_manifest(root)
    assert manifest.label_names == CAMUS_LABELS and manifest.modality == "US"
    assert len(manifest.cases) == 8 and not manifest.test_cases  # the half sequences carry no reference
    assert manifest.cases[0].case_id == "patient0001_2CH_ED"
    label = load_image(manifest.cases[0].label)
    assert tuple(label.shape) == (1, W, H, 1)
    assert set(np.unique(label.numpy()).tolist()) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.diag(label.affine.numpy())[:2], [0.31, 0.154], atol=1e-6)


@pytest.mark.parametrize("writer", [write_busi, write_camus])
def test_verify_data_and_train_unet2d(
    writer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.train import TrainRequest, train

    root = writer(tmp_path / "data")
    code, out = run_cli(["verify-data", str(root)], capsys, monkeypatch)
    assert code == 0, out
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_overrides("unet2d").items()}
    cfg = {
        "model": {"name": "unet2d", "roi_size": [64, 64], "kwargs": kwargs},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "lr": 1e-3, "warmup_iters": 0, "seed": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "run"
    result = train(TrainRequest(root, config=tmp_path / "c.yaml", out=out_dir, show_progress=False))
    assert result.steps == 2 and (out_dir / "checkpoints" / "best.pt").is_file()
    card = yaml.safe_load((out_dir / "card.json").read_text())
    expected = BUSI_LABELS if writer is write_busi else CAMUS_LABELS
    assert tuple(card["label_names"]) == expected
