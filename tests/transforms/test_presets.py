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
