from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medseg.core.errors import ConfigError
from medseg.training.losses import DeepSupervisionLoss, build_loss
from medseg.training.rundir import RunDir, load_checkpoint
from medseg.training.trainer import warmup_cosine
from pipelines.train import TrainRequest, train
from tests.helpers import tiny_config


def test_two_epoch_run_writes_the_run_dir_and_resume_continues(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml", epochs=2)
    run = tmp_path / "run"
    result = train(TrainRequest(tiny_dataset, config=cfg, out=run, show_progress=False))
    rd = RunDir(run)
    for path in (rd.config, rd.card, rd.last, rd.best, rd.metrics, rd.curves, rd.log):
        assert path.is_file(), path
    assert result.epochs == 2 and result.steps == 6
    records = [json.loads(line) for line in rd.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [3, 6]
    assert set(records[-1]["val_dice"]) == {"sphere", "box"}
    saved = yaml.safe_load(rd.config.read_text())
    assert saved["data"]["root"] == str(tiny_dataset) and saved["model"]["roi_size"] == [32, 32, 32]
    card = json.loads(rd.card.read_text())
    assert card["label_names"] == ["background", "sphere", "box"] and card["in_channels"] == 1
    assert not list(run.rglob("*.tmp")), "atomic writes leave no temp files"

    with pytest.raises(ConfigError, match="already holds a training run"):
        train(TrainRequest(tiny_dataset, config=cfg, out=run, show_progress=False))

    resumed = train(TrainRequest(tiny_dataset, config=cfg, out=run, epochs=3, resume=True, show_progress=False))
    assert resumed.epochs == 3 and resumed.steps == 9
    ckpt = load_checkpoint(rd.last)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 9
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2, 3]


def test_resume_without_checkpoint_is_an_error(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml")
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "none", resume=True, show_progress=False))


def test_training_is_seeded(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml", epochs=1)
    losses = []
    for name in ("a", "b"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / name, show_progress=False))
        losses.append(RunDir(tmp_path / name).read_metrics()[0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_schedule_warms_up_then_decays() -> None:
    f = warmup_cosine(total_steps=100, warmup=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) < 0.02 and f(55) == pytest.approx(0.505, abs=0.01)


def test_deep_supervision_loss_weights_levels() -> None:
    loss = build_loss("dice_ce")
    assert isinstance(loss, DeepSupervisionLoss)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    good = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 20
    bad = -good
    single = loss(good, target)
    mixed = loss([good, bad[..., ::2, ::2, ::2]], target)
    assert single < mixed < loss(bad, target)


@pytest.mark.parametrize(
    ("model", "extra"),
    [("segformer3d", {}), ("unet", {}), ("unet", {"deep_supervision": True, "deep_supr_num": 2})],
    ids=str,
)
def test_every_model_trains_through_the_trainer(model: str, extra: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from medseg.models import tiny_overrides

    cfg_path = tiny_config(tmp_path / "c.yaml", epochs=1, model=model)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["kwargs"] = {**tiny_overrides(model), **extra}
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = train(TrainRequest(tiny_dataset, config=cfg_path, out=tmp_path / "run", show_progress=False))
    assert result.steps == 3 and result.best_mean_dice is not None
