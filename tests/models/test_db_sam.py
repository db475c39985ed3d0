"""DB-SAM: piece sizes, freezing, the prompted forward contract, the SAM checkpoint mapping and a short fit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models import count_parameters, create_model, get_card, tiny_overrides
from medseg.models.db_sam import DBSAM, DBSAMConfig
from medseg.models.layers.db_sam_parts import ChannelAttentionBlock
from medseg.models.layers.ms_deform_attn import MSDeformAttn
from medseg.models.sam import write_synthetic_sam_checkpoint

S = 64  # tiny input side
BOXES = torch.tensor([[4.0, 6.0, 40.0, 44.0], [20.0, 10.0, 60.0, 50.0]])


def tiny(**kwargs: object) -> DBSAM:
    torch.manual_seed(0)
    return create_model("db_sam", **{**tiny_overrides("db_sam"), **kwargs})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def frozen_names(model: DBSAM) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def expected_frozen(names: list[str]) -> set[str]:
    prefixes = (
        "image_encoder.patch_embed.",
        "image_encoder.pos_embed",
        "image_encoder.blocks.",
        "prompt_encoder.",
        "mask_decoder.iou_prediction_head.",
        "mask_decoder.output_hypernetworks_mlps.1.",
        "mask_decoder.output_hypernetworks_mlps.2.",
        "mask_decoder.output_hypernetworks_mlps.3.",
    )
    return {n for n in names if n.startswith(prefixes)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny tensors gain nothing from intra-op threads, and thread hand-offs dominate on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model() -> DBSAM:
    return tiny()


# -- sizes and freezing ----------------------------------------------------------------------------------------------


def test_measured_piece_sizes() -> None:
    cab = n_params(ChannelAttentionBlock(768))
    assert abs(cab - 0.89e6) <= 0.02 * 0.89e6
    deform = n_params(MSDeformAttn(768, n_levels=5, n_heads=12, n_points=4))
    assert abs(deform - 1.73e6) <= 0.02 * 1.73e6


def test_full_build_on_meta_device() -> None:
    with torch.device("meta"):
        model = create_model("db_sam")
    assert model.img_size == 1024 and model.card.roi_size == (1024, 1024)
    assert n_params(model.mask_decoder) == 4_058_340
    assert n_params(model.prompt_encoder) == 6_220
    assert all(abs(n_params(cab) - 0.89e6) <= 0.02 * 0.89e6 for cab in model.cabs)
    total = count_parameters(model)
    assert total == get_card("db_sam").reference_params
    assert 140e6 < total < 175e6
    parts = ("cabs", "conv_branch", "interactions", "fusion", "fusion_norm", "image_encoder", "prompt_encoder")
    assert sum(n_params(getattr(model, p)) for p in parts) + n_params(model.mask_decoder) == total
    names = [n for n, _ in model.named_parameters()]
    assert frozen_names(model) == expected_frozen(names)
    vit_body = n_params(model.image_encoder) - n_params(model.image_encoder.neck)
    assert abs(vit_body - 88.9e6) <= 0.01 * 88.9e6
    unused_heads = n_params(model.mask_decoder.iou_prediction_head) + sum(
        n_params(mlp) for mlp in model.mask_decoder.output_hypernetworks_mlps[1:]
    )
    assert unused_heads == 132_612 + 3 * 139_808
    assert count_parameters(model, trainable_only=True) == total - vit_body - 6_220 - unused_heads == 58_541_632


def test_card_and_contract_attributes() -> None:
    card = get_card("db_sam")
    assert (card.in_channels, card.out_channels, card.spatial_dims, card.needs_prompts) == (3, 1, 2, True)
    assert card.divisible_by == (16, 16) and card.intensity_preset == "sam" and "2410.04172" in card.paper
    assert (DBSAM.paper_loss, DBSAM.box_jitter, DBSAM.in_channels, DBSAM.out_channels) == (
        "sam_dice_ce",
        "enlarge",
        3,
        1,
    )
    assert DBSAM.paper_schedule == "poly" and DBSAM.box_rule == "all_pixels"
    assert card.output == "sigmoid"
    with pytest.raises(ConfigError, match="in_channels=3"):
        create_model("db_sam", in_channels=1)
    with pytest.raises(ConfigError, match="out_channels=1"):
        create_model("db_sam", out_channels=2)
    with pytest.raises(ConfigError, match="multiple of 64"):
        tiny(img_size=96)


# -- forward contract ------------------------------------------------------------------------------------------------


def test_forward_backward_with_boxes_reaches_exactly_the_trainable_parameters(tiny_model: DBSAM) -> None:
    model = tiny_model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    y = model(torch.randn(2, 3, S, S), boxes=BOXES)
    assert y.shape == (2, 1, S, S) and torch.isfinite(y).all()
    y.float().mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert frozen_names(model) == expected_frozen(names)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not leaked, leaked[:5]
    model.zero_grad(set_to_none=True)


def test_points_alone_or_with_boxes_and_eval_mode(tiny_model: DBSAM) -> None:
    model = tiny_model.eval()
    torch.manual_seed(2)
    x = torch.randn(2, 3, S, S)
    coords = torch.tensor([[[20.0, 30.0], [5.0, 5.0]], [[40.0, 30.0], [60.0, 2.0]]])
    labels = torch.tensor([[1, 0], [1, 0]])
    with torch.no_grad():
        y_points = model(x, points=(coords, labels))
        y_both = model(x, boxes=BOXES, points=(coords, labels))
        y_box = model(x, boxes=BOXES)
    assert y_points.shape == y_both.shape == (2, 1, S, S)
    assert not torch.allclose(y_points, y_box) and not torch.allclose(y_both, y_box)


def test_rejected_inputs(tiny_model: DBSAM) -> None:
    model = tiny_model.eval()
    x = torch.randn(2, 3, S, S)
    with pytest.raises(ModelInputError, match="no prompt") as info:
        model(x)
    assert "boxes (B, 4)" in str(info.value) and "points ((B, N, 2), (B, N))" in str(info.value)
    with pytest.raises(ModelInputError, match="input is 32x32, expected 64x64"):
        model(torch.randn(2, 3, 32, 32), boxes=BOXES)
    with pytest.raises(ModelInputError, match="divisible"):
        model(torch.randn(2, 3, 72, S), boxes=BOXES)
    with pytest.raises(ModelInputError, match="channels"):
        model(torch.randn(2, 1, S, S), boxes=BOXES)
    with pytest.raises(ModelInputError, match="boxes have shape"):
        model(x, boxes=BOXES[:1])
    with pytest.raises(ModelInputError, match="points are"):
        model(x, points=(torch.zeros(2, 3, 2), torch.ones(2, 2)))
    with pytest.raises(ModelInputError, match="points are"):
        model(x, points=torch.zeros(2, 3, 2))  # type: ignore[arg-type]


# -- SAM checkpoint --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_vit_b.pth", seed=3)


def test_load_pretrained_maps_the_official_checkpoint(sam_file: Path) -> None:
    torch.manual_seed(0)
    model = create_model("db_sam")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("cabs.", "interactions.0."))}
    frozen_before = frozen_names(model)
    model.load_pretrained(sam_file)
    state = torch.load(sam_file, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    for key, value in state.items():
        assert key in ours, key
        assert torch.equal(ours[key], value), key
    assert any(k.startswith("image_encoder.neck.") for k in state)
    for key, value in before.items():
        assert torch.equal(ours[key], value), key
    assert frozen_names(model) == frozen_before


def test_vit_l_checkpoint_is_refused(tiny_model: DBSAM, tmp_path: Path) -> None:
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.ones(1024) for i in range(24)})
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam_vit_l.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="ViT-L"):
        tiny_model.load_pretrained(path)


# -- learning --------------------------------------------------------------------------------------------------------


def disc_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bright discs on noise, their masks and enlarged bounding boxes."""
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    images, masks, boxes = [], [], []
    for _ in range(n):
        r = 6 + 8 * torch.rand(1, generator=gen).item()
        cx, cy = (r + 2 + (S - 2 * r - 4) * torch.rand(2, generator=gen)).tolist()
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).float()
        images.append(2.0 * mask + 0.5 * torch.randn(S, S, generator=gen))
        masks.append(mask)
        boxes.append([max(cx - r - 2, 0), max(cy - r - 2, 0), min(cx + r + 2, S - 1), min(cy + r + 2, S - 1)])
    x = torch.stack(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.stack(masks)[:, None], torch.tensor(boxes)


def test_tiny_model_learns_bright_discs() -> None:
    model = tiny().train()
    gen = torch.Generator().manual_seed(0)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    x_val, y_val, b_val = disc_batch(gen, 4)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = loss_fn(model(x_val, boxes=b_val), y_val).item()
        model.train()
        return loss

    start = val_loss()
    for _ in range(40):
        x, y, b = disc_batch(gen, 4)
        optim.zero_grad()
        loss_fn(model(x, boxes=b), y).backward()
        optim.step()
    end = val_loss()
    assert end < 0.6 * start, (start, end)


# -- configuration dataclass -----------------------------------------------------------------------------------------


def test_builder_keywords_go_into_the_config_dataclass() -> None:
    with torch.device("meta"):
        model = create_model("db_sam", img_size=256, conv_channels=32, global_attn_indexes=[2, 5, 8, 11])
    assert isinstance(model.config, DBSAMConfig) and model.config.img_size == 256
    assert model.config.conv_channels == 32 and model.config.global_attn_indexes == (2, 5, 8, 11)
    assert model.card.roi_size == (256, 256) and model.image_encoder.pos_embed.shape == (1, 16, 16, 768)
    with pytest.raises(ConfigError, match=r"does not accept the options \['img_sise'\]") as info:
        create_model("db_sam", img_sise=256)
    assert "did you mean 'img_size'" in str(info.value)
    with pytest.raises(ConfigError, match="invalid SamConfig"):
        create_model("db_sam", embed_dim=50, num_heads=12)


# -- the paper's low-resolution loss and box rule --------------------------------------------------------------------


def test_low_res_logits_are_the_decoder_output_that_forward_upsamples(tiny_model: DBSAM) -> None:
    model = tiny_model.eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        low = model.forward_low_res(x, boxes=BOXES)
        full = model(x, boxes=BOXES)
    assert low.shape == (2, 1, S // 4, S // 4) and full.shape == (2, 1, S, S)
    up = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, up)
    assert model.loss_on_lowres and not tiny(loss_on_lowres=False).loss_on_lowres


def test_backward_reaches_every_decoder_parameter_except_the_frozen_unused_heads() -> None:
    """With everything unfrozen, the single-mask loss leaves exactly the heads DB-SAM freezes without gradient."""
    model = tiny().train()
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(4)
    x, target = torch.randn(2, 3, S, S), (torch.rand(2, 1, S // 4, S // 4) > 0.5).float()
    loss = DiceCELoss(sigmoid=True, squared_pred=True)(model.forward_low_res(x, boxes=BOXES), target)
    loss.backward()
    dead = {n for n, p in model.mask_decoder.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)}
    frozen = {n for n, p in tiny().mask_decoder.named_parameters() if not p.requires_grad}
    assert dead == frozen
    assert {n.split(".")[0] for n in frozen} == {"iou_prediction_head", "output_hypernetworks_mlps"}
    assert {n.split(".")[1] for n in frozen if n.startswith("output_")} == {"1", "2", "3"}


def _two_blob_case(tmp_path: Path) -> dict[str, object]:
    """A 40 x 40 x 2 volume whose label has a large and a small blob on slice 0 (voxel (x, y) = SAM (col, row))."""
    image = np.random.default_rng(0).normal(size=(40, 40, 2)).astype(np.float32)
    label = np.zeros((40, 40, 2), np.uint8)
    label[4:20, 6:18, 0] = 1  # large: x 4..19, y 6..17
    label[30:33, 30:34, 0] = 1  # small: x 30..32, y 30..33
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return {"image": [str(tmp_path / "img.nii.gz")], "label": str(tmp_path / "lab.nii.gz"), "case_id": "c"}


def test_training_boxes_follow_each_models_rule_and_db_sam_targets_are_low_res(tmp_path: Path) -> None:
    from medseg.training.prompted import PromptSliceDataset
    from medseg.transforms.sam import SamFrame, box_rule_of

    case = _two_blob_case(tmp_path)
    frame = SamFrame.for_slice(40, 40, S)
    rule = box_rule_of(DBSAM)
    assert rule == "all_pixels"
    ds = PromptSliceDataset([case], size=S, jitter=None, box_rule=rule, label_size=S // 4)
    item = ds[0]
    torch.testing.assert_close(item["box"], frame.box_to_model((4, 6, 32, 33)))  # every labelled pixel
    assert item["label"].shape == (1, S // 4, S // 4) and item["image"].shape == (3, S, S)
    largest = PromptSliceDataset([case], size=S, jitter=None, box_rule="largest_component")[0]
    torch.testing.assert_close(largest["box"], frame.box_to_model((4, 6, 19, 17)))
    assert largest["label"].shape == (1, S, S)


def test_prompted_trainer_computes_db_sam_loss_on_the_low_res_logits(tiny_model: DBSAM) -> None:
    from medseg.training.losses import build_loss
    from medseg.training.prompted import BOX, PromptTrainer

    model = tiny_model.eval()  # no dropout: the two evaluations below must agree
    trainer = PromptTrainer.__new__(PromptTrainer)
    trainer.model, trainer.device, trainer.loss_fn = model, torch.device("cpu"), build_loss("sam_dice_ce")
    assert trainer.low_res_loss
    torch.manual_seed(5)
    x = torch.randn(2, 3, S, S)
    label = (torch.rand(2, 1, S // 4, S // 4) > 0.5).float()
    with torch.no_grad():
        got = trainer.batch_loss({"image": x, "label": label, BOX: BOXES})
        expected = trainer.loss_fn(model.forward_low_res(x, boxes=BOXES), label)
    torch.testing.assert_close(got, expected)
    trainer.model = tiny(loss_on_lowres=False).eval()
    assert not trainer.low_res_loss


def test_evaluation_boxes_use_the_models_own_rule() -> None:
    from types import SimpleNamespace

    from pipelines.predict import _predict_with_label_boxes

    label = np.zeros((40, 40, 1), np.int64)
    label[4:20, 6:18, 0] = 1
    label[30:33, 30:34, 0] = 1
    boxes: dict[str, tuple] = {}
    for rule in ("all_pixels", "largest_component"):

        def predict(image: object, prompts: object, rule: str = rule) -> SimpleNamespace:
            box = prompts.objects[0].box  # type: ignore[attr-defined]
            boxes[rule] = (*box.lo, *box.hi)
            return SimpleNamespace(mask=np.zeros(label.shape, np.int64))

        predictor = SimpleNamespace(model=SimpleNamespace(box_rule=rule), predict=predict)
        _predict_with_label_boxes(predictor, None, label)
    assert boxes["all_pixels"] == (4, 6, 0, 32, 33, 0)
    assert boxes["largest_component"] == (4, 6, 0, 19, 17, 0)
