from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medseg.core.config import ExperimentConfig
from medseg.core.errors import ConfigError
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.training.losses import DeepSupervisionLoss, build_loss
from medseg.training.trainer import Trainer, lr_schedule, warmup_cosine, warmup_poly
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
    mixed = loss([good, bad[..., ::2, ::2, ::2], good[..., ::4, ::4, ::4]], target)  # nnU-Net weights 2/3, 1/3, 0
    assert single < mixed < loss(bad, target)


def _dense_cases() -> list:
    """Every registered dense 3D model (its tiny variant), plus unet with deep supervision."""
    from medseg.models import get_card, list_models

    names = [n for n in list_models() if not get_card(n).needs_prompts and get_card(n).spatial_dims == 3]
    cases = [pytest.param(name, {}, id=name) for name in names]
    cases.append(pytest.param("unet", {"deep_supervision": True, "deep_supr_num": 2}, id="unet-deep-supervision"))
    return cases


@pytest.mark.parametrize(("model", "extra"), _dense_cases())
def test_every_dense_model_trains_and_resumes(model: str, extra: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from medseg.models import tiny_overrides

    cfg_path = tiny_config(tmp_path / "c.yaml", epochs=1, model=model, iters_per_epoch=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["kwargs"] = {**tiny_overrides(model), **extra}
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    result = train(TrainRequest(tiny_dataset, config=cfg_path, out=run, show_progress=False))
    assert result.steps == 2 and result.best_mean_dice is not None
    resumed = train(TrainRequest(tiny_dataset, config=cfg_path, out=run, epochs=2, resume=True, show_progress=False))
    assert (resumed.epochs, resumed.steps) == (2, 4)
    assert [r["step"] for r in RunDir(run).read_metrics()] == [2, 4]
    ckpt = load_checkpoint(RunDir(run).last)
    assert (ckpt["epoch"], ckpt["step"], ckpt["model_name"]) == (2, 4, model)
    assert yaml.safe_load(RunDir(run).config.read_text())["train"]["epochs"] == 2  # the extended run's config


class _PaperPoly(torch.nn.Module):
    """A dummy model whose paper trains with a poly schedule."""

    paper_schedule = "poly"


def test_poly_schedule_warms_up_then_decays() -> None:
    f = warmup_poly(total_steps=110, warmup=10, min_ratio=0.0, exponent=0.9)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5**0.9) and f(110) == 0.0
    floor = warmup_poly(total_steps=110, warmup=10, min_ratio=0.1, exponent=0.9)
    assert floor(60) == pytest.approx(0.1 + 0.9 * 0.5**0.9) and floor(110) == pytest.approx(0.1)


def test_a_model_declares_its_paper_schedule_and_the_config_overrides_it() -> None:
    cfg = ExperimentConfig().updated({"train": {"epochs": 1, "iters_per_epoch": 10, "warmup_iters": 0}})
    assert lr_schedule(cfg, torch.nn.Linear(1, 1))[0] == "cosine"  # models that name none
    name, factor = lr_schedule(cfg, _PaperPoly())
    assert name == "poly" and factor(5) == pytest.approx(0.01 + 0.99 * 0.5**0.9)
    assert lr_schedule(cfg.updated({"train": {"schedule": "cosine"}}), _PaperPoly())[0] == "cosine"
    squared = cfg.updated({"train": {"schedule": "poly", "poly_exponent": 2.0, "min_lr_ratio": 0.0}})
    assert lr_schedule(squared, torch.nn.Linear(1, 1))[1](5) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match=r"poly_exponent=2\.0 is set but .* 'cosine'"):
        lr_schedule(cfg.updated({"train": {"poly_exponent": 2.0}}), torch.nn.Linear(1, 1))
    step_model = _PaperPoly()
    step_model.paper_schedule = "step"
    with pytest.raises(ConfigError, match="declares the LR schedule 'step'"):
        lr_schedule(cfg, step_model)


def test_the_trainer_steps_the_paper_schedule(tmp_path: Path) -> None:
    from medseg.models import create_model, tiny_overrides

    model = create_model("unet", in_channels=1, out_channels=2, **tiny_overrides("unet"))
    model.paper_schedule = "poly"  # what a model class declares, e.g. DB-SAM
    cfg = ExperimentConfig().updated(
        {"train": {"epochs": 2, "iters_per_epoch": 5, "warmup_iters": 0, "lr": 1.0, "min_lr_ratio": 0.0}}
    )
    trainer = Trainer(cfg, model, [], [], tmp_path / "run")
    assert trainer.schedule == "poly"
    lrs = []
    for _ in range(10):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([(1 - s / 10) ** 0.9 for s in range(10)])


def test_settings_a_trainer_does_not_use_are_refused() -> None:
    from medseg.training.prompted import PromptTrainer

    dense = ExperimentConfig().updated({"train": {"max_val_slices": 8}, "data": {"ct_window": [-100, 200]}})
    with pytest.raises(ConfigError) as info:
        Trainer.check_config(dense, default_preset="mri")
    msg = str(info.value)
    assert "train.max_val_slices=8 (default 64)" in msg and "dense 3D training" in msg
    assert "data.ct_window=[-100.0, 200.0]" in msg and "ct preset only" in msg
    Trainer.check_config(dense.updated({"train": {"max_val_slices": 64}}), default_preset="ct")  # used by ct

    prompted = ExperimentConfig().updated(
        {"model": {"name": "db_sam"}, "data": {"spacing": [1, 1, 1]}, "train": {"fg_ratio": 0.3, "max_val_slices": 8}}
    )
    with pytest.raises(ConfigError) as info:
        PromptTrainer.check_config(prompted.updated({"infer": {"tta": True}, "data": {"crop_foreground": True}}))
    msg = str(info.value)
    for key in ("data.spacing", "data.crop_foreground", "train.fg_ratio", "infer.tta"):
        assert key in msg, key
    assert "'db_sam'" in msg and "box-prompted 2D" in msg and "max_val_slices" not in msg
    PromptTrainer.check_config(ExperimentConfig().updated({"train": {"max_val_slices": 8}}))  # used by prompted
