"""``PromptPredictor``: slice-wise prompted inference whose masks land on the input's own voxel grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from medseg import open_predictor
from medseg.core.config import ExperimentConfig
from medseg.core.errors import ModelInputError
from medseg.inference import PromptPredictor, Prompts
from medseg.inference.rundir import RunDir, save_checkpoint
from medseg.io import save_mask
from medseg.models import ModelCard, create_model, get_card, tiny_overrides
from tests.helpers import make_case, tiny_affine

SIZE = 64


class BoxPainter(nn.Module):
    """A promptable stand-in with a known answer: paints the model-frame area of the box (or squares at points).

    ``half`` is half the slice-to-model scale, so the painted area is exactly the box's pixels. Inside logits are
    ``5 + 100 / box width`` so that of two overlapping boxes the narrower one is the more probable.
    """

    def __init__(self, half: float) -> None:
        super().__init__()
        self.card = get_card("sam_unet_r34").replace(name="box_painter", roi_size=(SIZE, SIZE))
        self.img_size = SIZE
        self.half = half
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, *, boxes: torch.Tensor | None = None, points: object = None) -> torch.Tensor:
        self.batches.append(x.shape[0])
        j = torch.arange(SIZE, dtype=torch.float32)
        out = torch.full((x.shape[0], 1, SIZE, SIZE), -10.0)
        for b in range(x.shape[0]):
            if boxes is not None:
                x0, y0, x1, y1 = boxes[b].tolist()
                cols = (j >= x0 - self.half) & (j < x1 + self.half)
                rows = (j >= y0 - self.half) & (j < y1 + self.half)
                out[b, 0][rows[:, None] & cols[None, :]] = 5.0 + 100.0 / (x1 - x0)
            else:
                coords, labels = points  # type: ignore[misc]
                for (px, py), label in zip(coords[b].tolist(), labels[b].tolist(), strict=True):
                    if label == 1:
                        out[b, 0, round(py) - 2 : round(py) + 3, round(px) - 2 : round(px) + 3] = 10.0
        return out


def _volume(affine: np.ndarray | None = None) -> MetaTensor:
    image, _ = make_case(np.random.default_rng(0))  # (32, 28, 36): slices of 28 rows x 32 cols, scale 2 to 64
    affine = tiny_affine() if affine is None else affine
    return MetaTensor(torch.from_numpy(image)[None], affine=torch.as_tensor(affine))


def _predictor(half: float = 1.0, slice_batch: int = 4) -> PromptPredictor:
    return PromptPredictor(BoxPainter(half), ExperimentConfig(), device="cpu", slice_batch=slice_batch)


def test_box_on_slices_3_to_5_lands_voxel_exactly_on_an_oblique_grid(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(_volume().numpy()[0], tiny_affine()), tmp_path / "image.nii.gz")
    result = _predictor().predict(tmp_path / "image.nii.gz", prompts=Prompts.from_cli(["5,4,20,15,3,5"], []))
    expected = np.zeros((32, 28, 36), np.uint8)
    expected[5:21, 4:16, 3:6] = 1
    assert result.mask.dtype == torch.uint8 and np.array_equal(result.mask.numpy(), expected)
    assert np.allclose(np.asarray(result.mask.affine), tiny_affine())
    assert result.label_names == ("background", "object_1") and result.probabilities is None
    voxel_ml = abs(np.linalg.det(tiny_affine()[:3, :3])) / 1000
    assert result.stats[0].voxels == 16 * 12 * 3 and result.stats[0].volume_ml == pytest.approx(576 * voxel_ml, 1e-3)
    saved = nib.load(str(save_mask(result.mask, result.image, tmp_path / "mask.nii.gz")))
    assert np.allclose(saved.affine, tiny_affine(), atol=1e-5) and np.array_equal(saved.get_fdata(), expected)


def test_ras_box_on_an_anisotropic_flipped_grid() -> None:
    affine = np.diag([-0.8, 1.5, 2.5, 1.0])
    affine[:3, 3] = (30.0, -12.0, 4.0)
    lo, hi = affine @ [5, 4, 3, 1.0], affine @ [20, 15, 5, 1.0]
    box = ",".join(f"{v:.3f}" for v in (min(lo[0], hi[0]), lo[1], max(lo[0], hi[0]), hi[1], lo[2], hi[2]))
    result = _predictor().predict(_volume(affine), prompts=Prompts.from_cli([box], [], space="ras"))
    expected = np.zeros((32, 28, 36), np.uint8)
    expected[5:21, 4:16, 3:6] = 1
    assert np.array_equal(result.mask.numpy(), expected)


def test_objects_get_their_label_values_names_and_the_more_probable_wins() -> None:
    prompts = Prompts.from_json(
        {"boxes": [[2, 2, 25, 20, 1, 2], [10, 5, 15, 9, 2, 3], [0, 22, 3, 26, 7, 7]], "names": ["a", "b", None]}
    )
    result = _predictor().predict(_volume(), prompts=prompts, keep_probabilities=True)
    mask = result.mask.numpy()
    assert result.label_names == ("background", "a", "b", "object_3")
    assert (mask[10:16, 5:10, 2] == 2).all()  # the narrower box is the more probable on the shared slice
    assert (mask[2:26, 2:21, 1] == 1).all() and (mask[10:16, 5:10, 3] == 2).all() and (mask[0:4, 22:27, 7] == 3).all()
    assert [s.voxels for s in result.stats] == [24 * 19 * 2 - 6 * 5, 6 * 5 * 2, 4 * 5]
    probs = result.probabilities
    assert probs is not None and probs.shape == (4, 32, 28, 36)
    torch.testing.assert_close(probs[0], 1 - probs[1:].max(0).values)


def test_point_only_object_segments_the_slices_of_its_points() -> None:
    result = _predictor().predict(_volume(), prompts=Prompts.from_cli([], ["10,12,7", "20,5,9:1"]))
    mask = result.mask.numpy()
    assert set(np.flatnonzero(mask.any(axis=(0, 1)))) == {7, 9}
    assert mask[10, 12, 7] == 1 and mask[20, 5, 9] == 1 and mask[20, 5, 7] == 0


def test_single_slice_rgb_image_keeps_picture_orientation() -> None:
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 40, 24, 1), generator=gen).float()  # (C, X = column, Y = row, 1)
    predictor = _predictor(half=0.8)  # 40 columns -> 64: scale 1.6
    result = predictor.predict(MetaTensor(rgb), prompts=Prompts.from_cli(["4,3,30,12"], []))
    expected = np.zeros((40, 24, 1), np.uint8)
    expected[4:31, 3:13] = 1
    assert result.mask.shape == (40, 24, 1) and np.array_equal(result.mask.numpy(), expected)


def test_batches_follow_slice_batch_and_do_not_change_the_answer() -> None:
    prompts = Prompts.from_cli(["5,4,20,15,3,7"], [])
    small = _predictor(slice_batch=2)
    one = small.predict(_volume(), prompts=prompts)
    assert small.model.batches == [2, 2, 1]
    assert torch.equal(one.mask, _predictor(slice_batch=8).predict(_volume(), prompts=prompts).mask)


def test_missing_prompts_and_wrong_channels_are_model_input_errors() -> None:
    predictor = _predictor()
    for prompts in (None, Prompts()):
        with pytest.raises(ModelInputError, match="model 'box_painter' is prompted and needs a box.*--box x0,y0,x1,y1"):
            predictor.predict(_volume(), prompts=prompts)
    with pytest.raises(ModelInputError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        predictor.predict(MetaTensor(torch.zeros(2, 8, 8, 2)), prompts=Prompts.from_cli(["1,1,5,5,0,1"], []))
    with pytest.raises(ModelInputError, match="outside the image"):
        predictor.predict(_volume(), prompts=Prompts.from_cli(["1,1,5,5,0,40"], []))


@pytest.mark.parametrize("name", ["sam_unet_r34", "db_sam"])
def test_real_tiny_models_predict_on_the_prompted_slices(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **tiny_overrides(name))
    predictor = PromptPredictor(model, ExperimentConfig(), device="cpu")
    assert predictor.size == model.img_size == SIZE
    image = MetaTensor(torch.from_numpy(make_case(np.random.default_rng(1), (20, 12, 6))[0])[None])
    prompts = Prompts.from_json({"boxes": [[2, 1, 15, 10, 2, 3]], "points": [[8, 5, 2, 1], [3, 9, 3, 0]]})
    result = predictor.predict(image, prompts=prompts, keep_probabilities=True)
    assert result.mask.shape == (20, 12, 6) and result.label_names == ("background", "object_1")
    assert not result.mask.numpy()[..., [0, 1, 4, 5]].any()
    probs = result.probabilities
    assert probs is not None and probs.shape == (2, 20, 12, 6) and torch.isfinite(probs).all()
    assert float(probs[1].min()) >= 0 and float(probs[1].max()) <= 1 and not probs[1, ..., 0].any()


def test_open_predictor_gives_a_prompt_predictor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = tiny_overrides("sam_unet_r34")
    model = create_model("sam_unet_r34", **kwargs)
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    config = ExperimentConfig().updated({"model": {"name": "sam_unet_r34", "kwargs": kwargs}})
    run.config.write_text(config.to_yaml())
    card: ModelCard = model.card
    state = {"model": model.state_dict(), "card": card.to_dict(), "model_name": card.name, "model_kwargs": kwargs}
    save_checkpoint(state, run.best)
    predictor = open_predictor(run.root, device="cpu")
    assert isinstance(predictor, PromptPredictor) and predictor.card.needs_prompts
    image = MetaTensor(torch.rand(1, 24, 40, 1) * 100)  # a grey picture, 40 rows x 24 columns
    result = predictor.predict(image, prompts=Prompts.from_cli(["2,3,20,30"], []))
    assert result.mask.shape == (24, 40, 1)
