"""2D models on medseg's 4D images: 2D images, frame-by-frame cines, depth-1 windows and masks pasted back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.core.config import ExperimentConfig
from medseg.core.errors import ModelInputError
from medseg.inference.engine import window_starts
from medseg.inference.planar import FrameWise, frame_roi, frame_window, source_mask
from medseg.inference.predictor import Predictor
from medseg.inference.sliding import WindowSettings
from medseg.models import create_model, get_card

FILTERS = (4, 8, 16)


def _predictor(name: str = "unet2d", **infer: object) -> Predictor:
    """A random tiny unet2d; the ct preset scales voxel by voxel, so a frame is normalised alike alone or in a cine."""
    torch.manual_seed(0)
    model = create_model(name, filters=FILTERS, strides=(1, 2, 2), in_channels=1, out_channels=3)
    config = ExperimentConfig().updated(
        {"model": {"name": name, "roi_size": [16, 16]}, "data": {"preset": "ct", "ct_window": [-3, 3]}, "infer": infer}
    )
    return Predictor(model, config, device="cpu")


def _image(shape: tuple[int, ...], seed: int = 0) -> MetaTensor:
    data = torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    return MetaTensor(data, affine=torch.diag(torch.tensor([0.3, 0.3, 1.0, 1.0], dtype=torch.float64)))


def test_unet2d_card_and_forward() -> None:
    card = get_card("unet2d")
    assert (card.spatial_dims, card.roi_size, card.divisible_by) == (2, (512, 512), (64, 64))
    net = create_model("unet2d", filters=FILTERS, strides=(1, 2, 2)).eval()
    assert net(torch.zeros(1, 1, 16, 24)).shape == (1, 2, 16, 24)
    with pytest.raises(ModelInputError):
        net(torch.zeros(1, 1, 16, 24, 1))  # the network itself is 2D; FrameWise adapts depth-1 windows


def test_framewise_squeezes_depth_one_windows_only() -> None:
    frames = FrameWise(create_model("unet2d", filters=FILTERS, strides=(1, 2, 2))).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(frames(x[..., None])[..., 0], frames.net(x))
    with pytest.raises(ModelInputError, match="one frame per window"):
        frames(torch.zeros(1, 1, 16, 16, 2))
    assert frame_roi((16, 16), 2) == (16, 16, 1) and frame_roi((8, 8, 8), 3) == (8, 8, 8)
    assert window_starts(7, 1, 0.5) == list(range(7))  # one window per frame, never two frames blended


def test_cine_is_segmented_frame_by_frame() -> None:
    """A cine (C, X, Y, T) gives exactly the masks of its frames segmented one by one as 2D images (C, X, Y)."""
    predictor = _predictor(crop_foreground=False)
    cine = _image((1, 21, 18, 5))
    whole = predictor.predict(cine)
    assert tuple(whole.mask.shape) == (21, 18, 5)
    assert torch.allclose(whole.mask.affine, cine.affine)
    for t in range(5):
        frame = predictor.predict(MetaTensor(cine.as_tensor()[..., t], affine=cine.affine))
        assert tuple(frame.mask.shape) == (21, 18)
        assert torch.equal(frame.mask.as_tensor(), whole.mask.as_tensor()[..., t]), t
    assert len(set(whole.mask.unique().tolist())) > 1  # a random network still draws several labels


def test_2d_image_shapes_accepted_for_2d_models_only() -> None:
    predictor = _predictor()
    predictor.check_image(_image((1, 20, 20)))
    predictor.check_image(_image((1, 20, 20, 3)))
    with pytest.raises(ModelInputError, match=r"expected \(C=1, X, Y\) or \(C=1, X, Y, Z\|T\)"):
        predictor.check_image(_image((1, 20)))
    with pytest.raises(ModelInputError, match="channel"):
        predictor.check_image(_image((3, 20, 20)))
    torch.manual_seed(0)
    model3d = create_model("unet", filters=FILTERS, strides=(1, 2, 2), in_channels=1, out_channels=2)
    config = ExperimentConfig().updated({"model": {"name": "unet", "roi_size": [16, 16, 16]}})
    with pytest.raises(ModelInputError, match=r"expected \(C=1, X, Y, Z\)"):
        Predictor(model3d, config, device="cpu").check_image(_image((1, 20, 20)))


def test_tta_mirrors_image_axes_only() -> None:
    predictor = _predictor(tta=True)
    assert predictor.window.roi_size == (16, 16, 1)
    assert predictor.window.engine().mirrors == ((), (0,))  # the default: left-right only
    every = frame_window(WindowSettings((16, 16), tta=True, tta_axes=None))  # all image axes, never the frame axis
    assert every.engine().mirrors == ((), (0,), (1,), (0, 1))


def test_source_mask_pastes_a_cropped_ultrasound_mask_back() -> None:
    meta = {"modality_adapter": "ultrasound", "crop_box": [2, 3, 6, 8], "source_frame_shape": [10, 12]}
    mask = MetaTensor(torch.ones(5, 6, 2, dtype=torch.uint8), affine=torch.diag(torch.tensor([0.3, 0.3, 1.0, 1.0])))
    mask.affine[:2, 3] = torch.tensor([0.6, 0.9])
    full = source_mask(mask, meta)
    assert tuple(full.shape) == (10, 12, 2) and int(full.sum()) == 5 * 6 * 2
    assert bool(full[2:7, 3:9].all()) and float(full.affine[0, 3]) == 0.0
    plain_mask = torch.zeros(4, 4, 1)
    assert source_mask(plain_mask, {}).shape == (4, 4, 1)
