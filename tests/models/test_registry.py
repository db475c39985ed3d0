"""The model registry and the model card."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medseg.core.errors import ConfigError
from medseg.models import ModelCard, create_model, get_card, list_models, tiny_overrides


@pytest.mark.parametrize(
    ("typo", "right"), [("segformer", "segformer3d"), ("unet3d", "unet"), ("SegFormer3D", "segformer3d")]
)
def test_unknown_name_suggests_the_right_one(typo: str, right: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(typo)
    message = str(info.value)
    assert "did you mean" in message and repr(right) in message
    with pytest.raises(ConfigError, match="did you mean"):
        get_card(typo)


def test_overrides_update_the_card() -> None:
    model = create_model("unet", **tiny_overrides("unet"), out_channels=5)
    assert model.card.out_channels == 5
    assert model.card.label_names == ("background", "foreground", "label_2", "label_3", "label_4")
    assert model.output_block.conv.conv.out_channels == 5

    names = ["background", "liver", "tumour"]
    model = create_model("unet", **tiny_overrides("unet"), label_names=names)
    assert model.card.label_names == tuple(names)
    assert model.card.out_channels == 3
    assert model.model_kwargs == tiny_overrides("unet")
    assert get_card("unet").out_channels == 2  # the registered card is untouched


def test_card_is_frozen() -> None:
    card = get_card("segformer3d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.out_channels = 7  # type: ignore[misc]
    model = create_model("segformer3d", **tiny_overrides("segformer3d"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.card.in_channels = 1


@pytest.mark.parametrize("bad", [{"embed_dim": 32}, {"filters_": (1, 2)}])
def test_unknown_keyword_raises_config_error(bad: dict[str, object]) -> None:
    for name in ("segformer3d", "unet"):
        with pytest.raises(ConfigError, match="does not accept") as info:
            create_model(name, **bad)
        assert name in str(info.value)


def test_invalid_values_are_reported_by_the_builder() -> None:
    with pytest.raises(ConfigError, match="2 filters and 6 strides") as info:
        create_model("unet", filters=(4, 8))
    assert "does not accept" not in str(info.value)


@pytest.mark.parametrize("name", list_models())
def test_card_dict_round_trip(name: str) -> None:
    card = get_card(name)
    assert ModelCard.from_dict(card.to_dict()) == card
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    changed = card.replace(label_names=("a", "b"), out_channels=2)
    assert ModelCard.from_dict(changed.to_dict()) == changed
    assert get_card(name) == card  # replace() returned a copy
