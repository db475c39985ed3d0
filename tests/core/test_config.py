from __future__ import annotations

from pathlib import Path

import pytest

from medseg.core.config import ExperimentConfig, load_config, validate_config
from medseg.core.errors import ConfigError, DataError, MedsegError
from medseg.core.registry import Registry

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    from medseg.models import get_card
    from medseg.training.losses import LOSSES

    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    get_card(cfg.model.name)  # the model exists
    if cfg.train.loss is not None:
        LOSSES.get(cfg.train.loss)


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_config(path)


def test_invalid_values_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.spacing"):
        validate_config({"data": {"spacing": [1, 0, 1]}})
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_updated_applies_changes_and_skips_none() -> None:
    cfg = ExperimentConfig().updated({"train": {"epochs": 7, "lr": None}, "model": {"name": "unet"}})
    assert cfg.train.epochs == 7 and cfg.train.lr == ExperimentConfig().train.lr and cfg.model.name == "unet"
    round_trip = validate_config(__import__("yaml").safe_load(cfg.to_yaml()))
    assert round_trip == cfg


def test_error_message_is_one_line_with_expected_and_hint() -> None:
    err = DataError("a.nii.gz has 2 channels", expected="1 channel", hint="check dataset.json", path="a.nii.gz")
    assert err.message == "a.nii.gz has 2 channels; expected 1 channel; hint: check dataset.json"
    assert "\n" not in str(err) and isinstance(err, MedsegError)
    assert err.to_dict() == {
        "error": "DataError",
        "detail": "a.nii.gz has 2 channels; expected 1 channel",
        "hint": "check dataset.json",
    }


def test_registry_suggests_and_refuses_duplicates() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("dice_ce", 1)
    with pytest.raises(ConfigError, match="did you mean 'dice_ce'"):
        reg.get("dice_cee")
    with pytest.raises(ConfigError, match="registered twice"):
        reg.add("dice_ce", 2)
    assert "dice_ce" in reg and len(reg) == 1 and list(reg) == ["dice_ce"]
