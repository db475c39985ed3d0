"""Contract tests run for every registered model (a new model needs no new test code here)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models import ModelCard, count_parameters, create_model, get_card, list_models, tiny_overrides

MODELS = list_models()


def _first(out: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, list | tuple) else out


def _small_shape(card: ModelCard) -> tuple[int, ...]:
    """Smallest allowed size per axis, the last axis doubled so the input is not a cube (nor a 1-voxel bottleneck).

    Prompted SAM models take exactly their square input size."""
    if card.needs_prompts:
        return tuple(card.roi_size)
    low = card.min_size or card.divisible_by  # e.g. MedViTV2: multiples of 32, at least 128
    side = [math.ceil(m / k) * k for m, k in zip(low, card.divisible_by, strict=True)]
    side[-1] += card.divisible_by[-1]
    return tuple(side)


def _out_shape(card: ModelCard, batch: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Logits ``(B, C_out, *S)`` of a dense model, ``(B, C_out)`` of a classifier."""
    return (batch, card.out_channels) if card.task == "classification" else (batch, card.out_channels, *shape)


def _call(model: nn.Module, x: Tensor) -> Tensor | list[Tensor]:
    """Forward ``x``; prompted models get one box per image (the central half of the input)."""
    if not model.card.needs_prompts:
        return model(x)
    h, w = x.shape[-2:]
    boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]).repeat(x.shape[0], 1)
    return model(x, boxes=boxes)


def _tiny(name: str, **extra: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **tiny_overrides(name), **extra)


@pytest.fixture(scope="module", params=MODELS)
def tiny_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, _tiny(request.param)


def test_registry_lists_the_first_models() -> None:
    assert {"segformer3d", "unet"} <= set(MODELS)


def test_forward_backward(tiny_model: tuple[str, nn.Module]) -> None:
    name, model = tiny_model
    card = model.card
    shape = _small_shape(card)
    assert len(shape) == card.spatial_dims
    model.train()
    x = torch.randn(2, card.in_channels, *shape)
    out = _call(model, x)
    outputs = out if isinstance(out, list | tuple) else [out]
    if card.needs_prompts:  # a point-only prompt reaches the point and padding embeddings a box does not use
        coords = torch.tensor([[[shape[1] / 2, shape[0] / 2], [2.0, 2.0]]]).repeat(2, 1, 1)
        outputs = [*outputs, model(x, points=(coords, torch.tensor([[1, 0]]).repeat(2, 1)))]
    for y in outputs:
        assert y.shape == _out_shape(card, 2, shape), name
        assert torch.isfinite(y).all(), name
    sum(y.float().mean() for y in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    model.zero_grad(set_to_none=True)


def test_state_dict_round_trip(tiny_model: tuple[str, nn.Module]) -> None:
    name, model = tiny_model
    card = model.card
    x = torch.randn(2, card.in_channels, *_small_shape(card))
    model.eval()
    other = create_model(name, **tiny_overrides(name))
    other.load_state_dict(model.state_dict(), strict=True)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(_call(other, x)), _first(_call(model, x)))


def test_card_matches_model(tiny_model: tuple[str, nn.Module]) -> None:
    name, model = tiny_model
    card = model.card
    assert card.name == name
    assert len(card.label_names) == card.out_channels
    assert len(card.divisible_by) == len(card.roi_size) == card.spatial_dims
    assert all(r % k == 0 for r, k in zip(card.roi_size, card.divisible_by, strict=True))
    assert getattr(model, "in_channels", card.in_channels) == card.in_channels
    assert getattr(model, "out_channels", card.out_channels) == card.out_channels
    model.eval()
    with torch.no_grad():
        y = _first(_call(model, torch.randn(1, card.in_channels, *_small_shape(card))))
    assert y.shape[1] == card.out_channels


def test_overridden_channels_reach_model_and_card(tiny_model: tuple[str, nn.Module]) -> None:
    name, _ = tiny_model
    if get_card(name).needs_prompts:  # RGB in, one mask per prompt out: other channel counts are refused
        with pytest.raises(ConfigError, match="channel"):
            _tiny(name, in_channels=2, out_channels=5)
        return
    model = _tiny(name, in_channels=2, out_channels=5).eval()
    assert (model.card.in_channels, model.card.out_channels) == (2, 5)
    shape = _small_shape(model.card)
    with torch.no_grad():
        assert _first(model(torch.randn(1, 2, *shape))).shape == _out_shape(model.card, 1, shape)


def test_rejects_indivisible_input(tiny_model: tuple[str, nn.Module]) -> None:
    name, model = tiny_model
    card = model.card
    shape = list(_small_shape(card))
    shape[0] += 1
    with pytest.raises(ModelInputError, match=name) as info:
        model(torch.randn(1, card.in_channels, *shape))
    assert "divisible" in str(info.value) and "axis 0" in str(info.value)


def test_rejects_wrong_channels_and_rank(tiny_model: tuple[str, nn.Module]) -> None:
    name, model = tiny_model
    card = model.card
    shape = _small_shape(card)
    with pytest.raises(ModelInputError, match=f"got {card.in_channels + 1} channels, expected {card.in_channels}"):
        model(torch.randn(1, card.in_channels + 1, *shape))
    with pytest.raises(ModelInputError, match="dimensions"):
        model(torch.randn(card.in_channels, *shape))


# Published or official-code parameter counts of the paper configurations (docs/models/<family>.md), with the unit
# they are quoted in: 1 = exact (assert equality), 1e4 = quoted to 0.01 M (assert the rounding). Models without a
# published count (MPU-Net, DB-SAM, the ``unet`` baseline) are checked against their card's own exact count only.
PUBLISHED: dict[str, tuple[float, float]] = {
    "segformer3d": (4_525_251, 1),  # official current code (the paper's 4.51 M is an older revision)
    "dformer": (50.56e6, 1e4),  # official definition, 14 classes, three heads
    "stunet_s": (14_596_941, 1),  # README 14.6 M, official definition at 1 in / 105 out
    "stunet_b": (58_262_669, 1),
    "stunet_l": (440_302_605, 1),
    "stunet_h": (1_457_326_221, 1),
    "sam_unet_r50": (138.43e6, 1e4),  # official modules
    "sam_unet_r34": (116.02e6, 1e4),
}


@pytest.fixture(scope="module")
def meta_counts() -> dict[str, int]:
    """Parameter count of every model's paper configuration, built on the meta device (no memory for weights)."""
    counts = {}
    with torch.device("meta"):
        for name in MODELS:
            counts[name] = count_parameters(create_model(name, **get_card(name).reference_config))
    return counts


@pytest.mark.parametrize("name", MODELS)
def test_full_config_matches_reference_params_exactly(name: str, meta_counts: dict[str, int]) -> None:
    card = get_card(name)
    assert card.reference_params is not None, f"{name}: the card names no reference parameter count"
    assert meta_counts[name] == card.reference_params, f"{name}: {meta_counts[name]:,} vs {card.reference_params:,}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_config_matches_the_published_count(name: str, meta_counts: dict[str, int]) -> None:
    figure, unit = PUBLISHED[name]
    assert round(meta_counts[name] / unit) == round(figure / unit), f"{name}: {meta_counts[name]:,} vs {figure:,}"


# -- contract details of individual families ------------------------------------------------------------------------


def test_unet_deep_supervision_returns_list_full_resolution_first() -> None:
    model = _tiny("unet", deep_supervision=True, deep_supr_num=2)
    assert model.card.divisible_by == (8, 8, 8)
    x = torch.randn(2, 1, 8, 16, 16)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 2, 8, 16, 16) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert isinstance(model.eval()(x), Tensor)


def test_unet_divisible_by_follows_strides() -> None:
    model = create_model("unet", filters=(4, 8, 16), strides=(1, (1, 2, 2), 2))
    assert model.divisible_by == (2, 4, 4)
    assert model.card.divisible_by == (2, 4, 4)
    assert get_card("unet").divisible_by == (32, 32, 32)


def test_unet_single_voxel_bottleneck_is_refused() -> None:
    model = _tiny("unet").eval()
    with pytest.raises(ModelInputError, match="bottleneck"):
        model(torch.randn(1, 1, 8, 8, 8))
