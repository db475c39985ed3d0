"""SAM-UNet specifics: paper sizes, prompted forward contract, SAM and ImageNet-ResNet weight mapping, learning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models import count_parameters, create_model, get_card, tiny_overrides
from medseg.models.sam import write_synthetic_sam_checkpoint
from medseg.models.sam_unet import SAMUNet, SAMUNetConfig

NAMES = ("sam_unet_r50", "sam_unet_r34")
# Measured on the official modules (docs/models/sam_unet.md), rounded to 0.01 M: total / trainable parameters.
PAPER_SIZES = {"sam_unet_r50": (138.43e6, 51.76e6), "sam_unet_r34": (116.02e6, 29.35e6)}
EXACT_TOTAL = {"sam_unet_r50": 138_428_204, "sam_unet_r34": 116_019_884}
R50_BREAKDOWN = {
    "resnet": 23.51e6,
    "adapters_in": 22.17e6,
    "adapters_bridge": 2.46e6,
    "mask_decoder": 3.54e6,
    "embedding_encoder": 0.07e6,
    "image_encoder": 86.67e6,
}
DROPPED = ("iou_token.", "mask_tokens.", "output_hypernetworks_mlps.", "iou_prediction_head.")
NEW_PARTS = (
    "resnet.",
    "adapters_in.",
    "adapters_bridge.",
    "embedding_encoder.",
    "mask_decoder.med_token.",
    "mask_decoder.hf_mlp.",
    "mask_decoder.embedding_maskfeature.",
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast and does not stall when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny(name: str = "sam_unet_r34", seed: int = 0) -> SAMUNet:
    torch.manual_seed(seed)
    return create_model(name, **tiny_overrides(name))


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", NAMES)
def test_paper_parameter_counts(name: str) -> None:
    """The paper's counts are rounded to 0.01 M: assert the rounding, and our exact count on the card."""
    with torch.device("meta"):
        model = create_model(name)
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    assert total == get_card(name).reference_params == EXACT_TOTAL[name]
    # medseg also freezes the prompt encoder's mask downscaling (no mask prompts); the release trains it
    mask_downscaling = _size(model.prompt_encoder.mask_downscaling)
    assert mask_downscaling == 4_684
    paper_total, paper_trainable = PAPER_SIZES[name]
    assert round(total / 1e4) == round(paper_total / 1e4)
    assert round((trainable + mask_downscaling) / 1e4) == round(paper_trainable / 1e4)
    assert round(_size(model.image_encoder) / 1e4) == 8667  # frozen ViT: 86.67 M
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert model.image_encoder.pos_embed.shape == (1, 16, 16, 768)
    if name == "sam_unet_r50":
        for part, millions in R50_BREAKDOWN.items():
            got = _size(getattr(model, part))
            # quoted to 0.01 M; adapters_in (22,164,992, the same layers as the release) is quoted as 22.17 M
            assert abs(got - millions) <= 1e4, (part, got)
        assert model.feature_channels == (256, 512, 1024, 2048)
    else:
        assert model.feature_channels == (64, 128, 256, 512)


def test_builder_keywords_go_into_the_config_dataclass() -> None:
    with torch.device("meta"):
        model = create_model("sam_unet_r34", img_size=128, resnet_layers=[2, 2, 2, 2])
    assert isinstance(model.config, SAMUNetConfig)
    assert (model.config.img_size, model.config.resnet_block, model.config.resnet_layers) == (
        128,
        "basic",
        (2, 2, 2, 2),
    )
    assert model.card.roi_size == (128, 128)
    with pytest.raises(ConfigError, match=r"does not accept the options \['resnet_layer'\]") as info:
        create_model("sam_unet_r50", resnet_layer=(3, 4, 6, 3))
    assert "did you mean 'resnet_layers'" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_card_and_attributes(name: str) -> None:
    card = get_card(name)
    assert card.needs_prompts and card.spatial_dims == 2 and card.roi_size == (256, 256)
    assert (card.in_channels, card.out_channels, card.label_names) == (3, 1, ("foreground",))
    assert card.divisible_by == (16, 16) and card.intensity_preset == "sam" and "2408.09886" in card.paper
    model = tiny(name)
    assert model.card.roi_size == (64, 64)
    assert (model.img_size, model.paper_loss, model.box_jitter) == (64, "sam_focal_dice", "shift")
    assert model.box_rule == "largest_component" and not hasattr(model, "loss_on_lowres")
    assert card.output == "sigmoid"
    assert (model.in_channels, model.out_channels) == (3, 1)
    with pytest.raises(ConfigError, match="in_channels=1"):
        create_model(name, in_channels=1)
    with pytest.raises(ConfigError, match="out_channels=2"):
        create_model(name, out_channels=2)


# ----------------------------------------------------------------------------------------------------- forward
def test_forward_backward_reaches_every_trainable_parameter(one_thread: None) -> None:
    model = tiny("sam_unet_r50")
    model.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 30.0, 20.0]])
    points = (torch.tensor([[[20.0, 30.0], [5.0, 60.0]], [[15.0, 15.0], [50.0, 50.0]]]), torch.tensor([[1, 0], [1, 0]]))
    out = model(x, boxes=boxes, points=points)
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    out.mean().backward()
    only_points = model(x, points=points)  # a padding point replaces the missing box
    assert only_points.shape == (2, 1, 64, 64)
    only_points.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("image_encoder.", "prompt_encoder.mask_downscaling.")) for n in frozen)
    assert all(p.grad is None for p in model.image_encoder.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x, boxes=boxes).shape == (2, 1, 64, 64)


def test_input_errors() -> None:
    model = tiny()
    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
    with pytest.raises(ModelInputError, match=r"boxes \(B, 4\)"):
        model(x)
    with pytest.raises(ModelInputError, match="input is 128x128, expected 64x64"):
        model(torch.randn(1, 3, 128, 128), boxes=box)
    with pytest.raises(ModelInputError, match="channel"):
        model(torch.randn(1, 1, 64, 64), boxes=box)
    with pytest.raises(ModelInputError, match="divisible"):
        model(torch.randn(1, 3, 64, 72), boxes=box)
    with pytest.raises(ModelInputError, match="boxes have shape"):
        model(x, boxes=torch.zeros(1, 2, 4))
    with pytest.raises(ModelInputError, match="boxes have shape"):
        model(x, boxes=torch.zeros(2, 4))
    with pytest.raises(ModelInputError, match="points are"):
        model(x, points=(torch.zeros(1, 3, 2), torch.ones(1, 2)))
    with pytest.raises(ModelInputError, match="points are"):
        model(x, points=torch.zeros(1, 3, 2))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- SAM weights
@pytest.fixture(scope="module")
def sam_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_synthetic.pth"
    write_synthetic_sam_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="module")
def full_r34() -> SAMUNet:
    torch.manual_seed(0)
    return create_model("sam_unet_r34")


def test_load_pretrained_maps_the_official_checkpoint(sam_file: Path, full_r34: SAMUNet) -> None:
    model = full_r34
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(NEW_PARTS)}
    model.load_pretrained(sam_file)
    file = torch.load(sam_file, map_location="cpu", weights_only=True)
    state = model.state_dict()

    pos = file["image_encoder.pos_embed"]
    assert pos.shape == (1, 64, 64, 768)
    expected = F.interpolate(pos.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(state["image_encoder.pos_embed"], expected.permute(0, 2, 3, 1))
    resized = set()
    for g in (2, 5, 8, 11):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{g}.attn.rel_pos_{axis}"
            assert file[key].shape == (127, 64) and state[key].shape == (31, 64)
            want = F.interpolate(file[key][None, None], size=(31, 64), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(state[key], want)
            resized.add(key)
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # windowed: unchanged

    dropped = [k for k in file if k.startswith(tuple("mask_decoder." + p for p in DROPPED))]
    assert dropped and not any(k in state for k in dropped)
    assert not any(p.rstrip(".") in k for k in state for p in DROPPED)  # nothing of the model could take them
    loaded = [k for k in file if k not in dropped and k not in resized and k != "image_encoder.pos_embed"]
    assert set(loaded) | resized | {"image_encoder.pos_embed"} == {k for k in state if not k.startswith(NEW_PARTS)}
    for key in loaded:
        assert torch.equal(state[key], file[key]), key
    for key, value in before.items():  # new parts stay at their initialisation
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.mask_decoder.transformer.parameters())


def test_load_pretrained_refuses_a_mismatched_model(sam_file: Path) -> None:
    with pytest.raises(WeightsError):
        tiny().load_pretrained(sam_file)
    with pytest.raises(WeightsError):
        tiny().load_pretrained(sam_file.with_name("missing.pth"))


# ----------------------------------------------------------------------------------------------------- ResNet weights
def torchvision_resnet_layout(block: str, layers: tuple[int, ...], widths: tuple[int, ...]) -> dict[str, tuple]:
    """Key -> shape of a torchvision ``ResNet`` state dict (``resnet34``: basic (3, 4, 6, 3); ``resnet50``: bottleneck).

    Written from torchvision's definition: 7x7 stem ``conv1`` / ``bn1``, ``layer{i}.{j}`` blocks (basic: two 3x3
    convs; bottleneck: 1x1, 3x3, 1x1 with x4 expansion), ``downsample.{0: 1x1 conv, 1: BN}`` on the first block of a
    stage that changes shape, classifier ``fc`` for 1000 classes.
    """
    table: dict[str, tuple] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            table[f"{prefix}.{name}"] = (c,)
        table[f"{prefix}.num_batches_tracked"] = ()

    expansion = 4 if block == "bottleneck" else 1
    table["conv1.weight"] = (widths[0], 3, 7, 7)
    bn("bn1", widths[0])
    cin = widths[0]
    for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if block == "bottleneck":
                table[f"{p}.conv1.weight"] = (w, cin, 1, 1)
                table[f"{p}.conv2.weight"] = (w, w, 3, 3)
                table[f"{p}.conv3.weight"] = (w * 4, w, 1, 1)
                bn(f"{p}.bn1", w), bn(f"{p}.bn2", w), bn(f"{p}.bn3", w * 4)
            else:
                table[f"{p}.conv1.weight"] = (w, cin, 3, 3)
                table[f"{p}.conv2.weight"] = (w, w, 3, 3)
                bn(f"{p}.bn1", w), bn(f"{p}.bn2", w)
            if j == 0 and (i > 0 or cin != w * expansion):
                table[f"{p}.downsample.0.weight"] = (w * expansion, cin, 1, 1)
                bn(f"{p}.downsample.1", w * expansion)
            cin = w * expansion
    table["fc.weight"], table["fc.bias"] = (1000, cin), (1000,)
    return table


def write_torchvision_file(path: Path, table: dict[str, tuple], seed: int = 3) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(shape, generator=gen) + 0.1
        for k, shape in table.items()
    }
    torch.save(state, path)
    return state


def test_torchvision_tables_match_the_known_sizes() -> None:
    r34 = torchvision_resnet_layout("basic", (3, 4, 6, 3), (64, 128, 256, 512))
    r50 = torchvision_resnet_layout("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512))
    params = lambda t: sum(torch.Size(s).numel() for k, s in t.items() if "running" not in k and "batches" not in k)  # noqa: E731
    assert params(r34) == 21_797_672 and params(r50) == 25_557_032  # torchvision resnet34 / resnet50
    assert r34["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and "layer1.0.downsample.0.weight" not in r34
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1) and r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)


def test_resnet_weights_full_r34(tmp_path: Path, full_r34: SAMUNet) -> None:
    state = write_torchvision_file(
        tmp_path / "r34.pth", torchvision_resnet_layout("basic", (3, 4, 6, 3), (64, 128, 256, 512))
    )
    full_r34.load_resnet_weights(tmp_path / "r34.pth")
    got = full_r34.resnet.state_dict()
    assert set(got) == {k for k in state if not k.startswith("fc.")}
    for key, value in got.items():
        assert torch.equal(value, state[key]), key


def test_resnet_weights_tiny_r50_and_errors(tmp_path: Path) -> None:
    model = tiny("sam_unet_r50")
    widths = tiny_overrides("sam_unet_r50")["resnet_inplanes"]
    table = torchvision_resnet_layout("bottleneck", (1, 1, 1, 1), tuple(widths))
    state = write_torchvision_file(tmp_path / "r50.pth", table)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    model.load_resnet_weights(tmp_path / "wrapped.pth")
    for key, value in model.resnet.state_dict().items():
        assert torch.equal(value, state[key]), key

    partial = {k: v for k, v in state.items() if k != "layer3.0.conv2.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing: layer3.0.conv2.weight"):
        model.load_resnet_weights(tmp_path / "partial.pth")
    torch.save({**state, "layer1.0.se.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="layer1.0.se.weight"):
        model.load_resnet_weights(tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="mis-shaped"):
        tiny("sam_unet_r34").load_resnet_weights(tmp_path / "r50.pth")  # basic blocks have no conv3: also "unexpected"
    with pytest.raises(WeightsError, match="sha256"):
        model.load_resnet_weights(tmp_path / "r50.pth", sha256="0" * 64)


# ----------------------------------------------------------------------------------------------------- learning
def _disc_batch(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks, boxes = [], [], []
    for _ in range(n):
        r = float(torch.randint(6, 14, (1,), generator=gen))
        cy, cx = (float(v) for v in torch.randint(16, size - 16, (2,), generator=gen))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
        image = mask * 1.5 + 0.3 * torch.randn(size, size, generator=gen)
        images.append(image.expand(3, -1, -1))
        masks.append(mask[None])
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
    return torch.stack(images), torch.stack(masks), torch.stack(boxes)


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def test_tiny_model_learns_boxed_discs(one_thread: None) -> None:
    model = tiny("sam_unet_r34", seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y, boxes = _disc_batch(6, 64, gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = _loss(model(x, boxes=boxes), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:5]) / 5, losses


def test_load_pretrained_recognises_a_resnet_file(tmp_path: Path) -> None:
    """``--pretrained`` takes the SAM checkpoint and the ImageNet ResNet file alike: the keys say which is which."""
    model = create_model("sam_unet_r50", **tiny_overrides("sam_unet_r50"))
    state = {k: v.clone() for k, v in model.resnet.state_dict().items()}
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model.load_pretrained(path)
    for key, value in model.resnet.state_dict().items():
        torch.testing.assert_close(value, state[key])
