from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.errors import ConfigError
from medseg.transforms import preprocessing, training_transforms


def _image(values: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def test_ct_preset_clips_and_scales_window() -> None:
    values = np.linspace(-2000, 2000, 8 * 8 * 8).reshape(8, 8, 8)
    out = preprocessing("ct", None, with_label=False, ct_window=(-1000, 1000), load=False)(
        {"image": _image(values, np.eye(4))}
    )
    img = out["image"]
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    mid = values == values.flat[np.argmin(np.abs(values))]
    assert np.allclose(np.asarray(img[0])[mid], (values[mid] + 1000) / 2000, atol=1e-6)


def test_mri_preset_zscores_nonzero_only() -> None:
    rng = np.random.default_rng(0)
    values = np.zeros((10, 10, 10))
    values[2:8, 2:8, 2:8] = rng.normal(300, 50, (6, 6, 6))
    img = np.asarray(
        preprocessing("mri", None, with_label=False, load=False)({"image": _image(values, np.eye(4))})["image"]
    )[0]
    inside = values != 0
    assert abs(img[inside].mean()) < 1e-4 and abs(img[inside].std() - 1) < 1e-2
    assert np.all(img[~inside] == 0)


def test_orientation_and_spacing_are_applied_once() -> None:
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])  # L-flipped, anisotropic
    out = preprocessing("mri", (1.0, 1.0, 1.0), with_label=True, load=False)(
        {"image": _image(np.ones((8, 8, 4)), affine), "label": _image(np.ones((8, 8, 4)), affine)}
    )
    for key in ("image", "label"):
        a = np.asarray(out[key].affine)
        assert np.allclose(np.diag(a)[:3], [1.0, 1.0, 1.0])  # RAS, 1 mm
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 1.0}


def test_training_transforms_yield_roi_patches(tiny_dataset) -> None:
    from medseg.data import load_manifest

    case = load_manifest(tiny_dataset).cases[0].as_dict()
    t = training_transforms("mri", None, (16, 16, 16), fg_ratio=1.0)
    t.set_random_state(seed=0)
    patches = t(case)
    assert isinstance(patches, list) and len(patches) == 1
    patch = patches[0]
    assert patch["image"].shape == (1, 16, 16, 16) and patch["label"].shape == (1, 16, 16, 16)


def test_unknown_preset_and_bad_window() -> None:
    with pytest.raises(ConfigError, match="unknown intensity preset"):
        preprocessing("pet", None, with_label=False)
    with pytest.raises(ConfigError, match="ct_window"):
        preprocessing("ct", None, with_label=False, ct_window=(100, -100))


def _nnunet_zscore(image: np.ndarray) -> np.ndarray:
    """nnU-Net v2 ``ZScoreNormalization`` (``use_mask_for_norm=False``) of one channel, written with numpy."""
    image = image.astype(np.float32)
    mean, std = image.mean(), image.std()
    return (image - mean) / max(std, 1e-8)


def test_zscore_preset_matches_nnunet_over_all_voxels() -> None:
    rng = np.random.default_rng(0)
    values = np.zeros((2, 10, 12, 8))
    values[0, 2:8, 2:8, 2:6] = rng.normal(300, 50, (6, 6, 4))  # zeros outside count too (unlike ``mri``)
    values[1] = rng.normal(-20, 3, (10, 12, 8))
    image = MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=torch.as_tensor(np.diag([2.0, 1, 1, 1])))
    out = preprocessing("zscore", None, with_label=False, load=False)({"image": image})["image"]
    got = np.asarray(out)
    assert out.dtype == torch.float32 and isinstance(out, MetaTensor)
    for c in range(2):
        np.testing.assert_allclose(got[c], _nnunet_zscore(values[c]), rtol=1e-5, atol=1e-5)
    assert abs(got[0][values[0] == 0].mean()) > 0.1  # background voxels moved: all voxels were used
    mri = np.asarray(preprocessing("mri", None, with_label=False, load=False)({"image": image})["image"])
    assert not np.allclose(mri[0], got[0])


def test_zscore_preset_guards_a_near_constant_image_like_nnunet() -> None:
    values = np.full((1, 4, 4, 4), 5.0)
    values[0, 0, 0, 0] += 1e-10  # std far below 1e-8: nnU-Net divides by 1e-8, not by the std
    image = MetaTensor(torch.as_tensor(values, dtype=torch.float64), affine=torch.eye(4, dtype=torch.float64))
    got = np.asarray(preprocessing("zscore", None, with_label=False, load=False)({"image": image})["image"])
    mean, std = values.mean(), values.std()
    np.testing.assert_allclose(got, (values - mean) / max(std, 1e-8), rtol=1e-4, atol=1e-6)
    assert np.abs(got).max() < 0.02


def test_stunet_card_uses_the_zscore_preset() -> None:
    from medseg.models import get_card

    assert all(get_card(n).intensity_preset == "zscore" for n in ("stunet_s", "stunet_b", "stunet_l", "stunet_h"))
