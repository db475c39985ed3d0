"""The predictor's geometry contract: masks land voxel-for-voxel on the input grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.errors import ModelInputError
from medseg.inference import Predictor
from medseg.io import load_image, save_mask
from medseg.models import ModelCard


class ThresholdNet(nn.Module):
    """Logits (0.5, x): label 1 exactly where the (CT-window-scaled) intensity exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.card = ModelCard(
            name="threshold",
            task="segmentation",
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            roi_size=(16, 16, 16),
            divisible_by=(1, 1, 1),
            target_spacing=None,
            intensity_preset="ct",
            label_names=("background", "object"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5), x], dim=1)


def _config(spacing: tuple[float, float, float] | None) -> ExperimentConfig:
    return ExperimentConfig().updated(
        {"data": {"preset": "ct", "ct_window": [0.0, 1.0], "spacing": spacing}, "model": {"roi_size": [16, 16, 16]}}
    )


def _phantom(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    obj = np.linalg.norm(grid - np.array(shape) * [0.4, 0.55, 0.5], axis=-1) < 6
    obj[2:6, 3:9, 1:4] = True  # an asymmetric block: flips or transposes would move it
    return obj


def _lps_nrrd(path: Path, obj: np.ndarray) -> None:
    img = sitk.GetImageFromArray(obj.astype(np.float32).transpose(2, 1, 0))
    img.SetSpacing((0.8, 1.4, 2.5))
    img.SetOrigin((10.0, -20.0, 35.0))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, 0, s, 0, -1, 0, -s, 0, c))  # oblique and flipped in LPS
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_mask_is_voxel_exact_on_oblique_lps_input(tmp_path: Path, suffix: str) -> None:
    obj = _phantom((30, 26, 18))
    src = tmp_path / "phantom.nrrd"
    _lps_nrrd(src, obj)
    if suffix == ".nii.gz":  # the same image as an oblique NIfTI
        ref = load_image(src)
        nib.save(nib.Nifti1Image(obj.astype(np.float32), np.asarray(ref.affine)), tmp_path / "phantom.nii.gz")
        src = tmp_path / "phantom.nii.gz"
    predictor = Predictor(ThresholdNet(), _config(None), device="cpu")
    result = predictor.predict(src)
    assert tuple(result.mask.shape) == obj.shape
    np.testing.assert_array_equal(np.asarray(result.mask), obj.astype(np.uint8))
    out = save_mask(result.mask, result.image, tmp_path / f"mask{suffix}")
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize()
    tol = 1e-5 if suffix == ".nii.gz" else 1e-9
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b).transpose(2, 1, 0), obj.astype(np.uint8))
    stats = result.stats_dict()["labels"]["object"]
    assert stats["voxels"] == int(obj.sum())
    assert stats["volume_ml"] == pytest.approx(obj.sum() * 0.8 * 1.4 * 2.5 / 1000, rel=1e-3)


def test_resampled_prediction_maps_back_to_the_input_grid(tmp_path: Path) -> None:
    obj = _phantom((30, 26, 18))
    src = tmp_path / "phantom.nrrd"
    _lps_nrrd(src, obj)
    result = Predictor(ThresholdNet(), _config((1.0, 1.0, 1.0)), device="cpu").predict(src)
    mask = np.asarray(result.mask).astype(bool)
    assert mask.shape == obj.shape
    dice = 2 * (mask & obj).sum() / (mask.sum() + obj.sum())
    assert dice > 0.9
    assert np.allclose(np.argwhere(mask).mean(0), np.argwhere(obj).mean(0), atol=0.5)


def test_flip_tta_keeps_an_equivariant_answer(tmp_path: Path) -> None:
    obj = _phantom((20, 22, 18))
    src = tmp_path / "p.nrrd"
    _lps_nrrd(src, obj)
    result = Predictor(ThresholdNet(), _config(None), device="cpu").predict(src, tta=True)
    np.testing.assert_array_equal(np.asarray(result.mask), obj.astype(np.uint8))


def test_wrong_channel_count_is_a_model_input_error(tmp_path: Path) -> None:
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), path)
    with pytest.raises(ModelInputError, match="2 channel"):
        Predictor(ThresholdNet(), _config(None), device="cpu").predict(path)


def test_open_predictor_errors(tmp_path: Path) -> None:
    from medseg import open_predictor
    from medseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        open_predictor(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a model folder medseg can open"):
        open_predictor(tmp_path)
