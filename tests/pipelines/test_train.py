"""``medseg train``: what ``--resume`` accepts, settings a model family does not use, STU-Net ``--pretrained``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import pipelines.train as train_pipeline
from medseg.core.errors import ConfigError, WeightsError
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.models.stunet import STUNet
from medseg.training.trainer import Trainer
from pipelines.train import TrainRequest, train
from tests.helpers import prompted_config, run_cli, tiny_config


@pytest.fixture(scope="module")
def one_epoch_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, run directory) of a tiny segformer3d trained for one epoch. Read-only."""
    root = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(root / "tiny.yaml", epochs=1, iters_per_epoch=1)
    train(TrainRequest(tiny_dataset, config=cfg, out=root / "run", show_progress=False))
    return cfg, root / "run"


def _resume(data: Path, run: Path, **options: object) -> None:
    train(TrainRequest(data, out=run, resume=True, show_progress=False, **options))  # type: ignore[arg-type]


def test_resume_refuses_each_conflicting_option(one_epoch_run: tuple[Path, Path], tiny_dataset: Path) -> None:
    cfg, run = one_epoch_run
    before = RunDir(run).config.read_text()
    with pytest.raises(ConfigError) as info:
        _resume(tiny_dataset, run, model="unet", pretrained=(Path("w.pth"),))
    msg = str(info.value)
    assert "2 option(s) conflict" in msg and str(RunDir(run).config) in msg
    assert "--model (model.name): saved 'segformer3d', given 'unet'" in msg
    assert "--pretrained (model.pretrained): saved [], given ['w.pth']" in msg
    assert "only --epochs may change" in msg

    changed = yaml.safe_load(cfg.read_text())
    changed["train"]["lr"] = 1e-4
    changed["model"]["kwargs"]["decoder_dim"] = 16
    changed["train"]["epochs"] = 5  # may change: not a conflict
    other = cfg.with_name("other.yaml")
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError) as info:
        _resume(tiny_dataset, run, config=other)
    msg = str(info.value)
    assert "2 option(s) conflict" in msg and f"--config {other} (train.lr): saved 0.001, given 0.0001" in msg
    assert "(model.kwargs): saved {" in msg and "'decoder_dim': 32" in msg and "'decoder_dim': 16" in msg

    copy = run.parent / "other_data"
    shutil.copytree(tiny_dataset, copy, dirs_exist_ok=True)
    with pytest.raises(ConfigError, match=r"DATA \(data.root\): saved .*, given .*other_data.*edit data.root"):
        _resume(copy, run)
    assert RunDir(run).config.read_text() == before, "a refused resume changes nothing"
    assert load_checkpoint(RunDir(run).last)["epoch"] == 1


def test_resume_accepts_its_own_options_and_a_longer_run(one_epoch_run: tuple[Path, Path], tiny_dataset: Path) -> None:
    cfg, saved_run = one_epoch_run
    run = saved_run.parent / "extended"
    shutil.copytree(saved_run, run)
    _resume(tiny_dataset, run, config=cfg, model="segformer3d", epochs=2)  # the same settings, one more epoch
    assert load_checkpoint(RunDir(run).last)["epoch"] == 2
    assert yaml.safe_load(RunDir(run).config.read_text())["train"]["epochs"] == 2


def test_resume_on_the_cli_without_model_keeps_the_saved_one(
    one_epoch_run: tuple[Path, Path], tiny_dataset: Path, capsys, monkeypatch
) -> None:
    _, saved_run = one_epoch_run
    run = saved_run.parent / "cli"
    shutil.copytree(saved_run, run)
    code, out = run_cli(
        ["train", str(tiny_dataset), "--out", str(run), "--resume", "--no-progress"], capsys, monkeypatch
    )
    assert code == 0, out  # no --model: the run's own (segformer3d), not a default that could conflict
    code, out = run_cli(
        ["train", str(tiny_dataset), "--out", str(run), "--resume", "--model", "unet", "--no-progress"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and "Traceback" not in out and "given 'unet'" in out


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("data", "spacing", [1.0, 1.0, 1.0]),
        ("data", "crop_foreground", True),
        ("data", "preset", "ct"),
        ("train", "fg_ratio", 0.3),
        ("infer", "tta", True),
    ],
)
def test_prompted_training_refuses_settings_it_does_not_use(
    section: str, key: str, value: object, tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = prompted_config(tmp_path / "c.yaml", model="db_sam")
    data = yaml.safe_load(cfg.read_text())
    data.setdefault(section, {})[key] = value
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match=rf"'db_sam' \(box-prompted 2D training on image slices\) .*{section}\.{key}="
    ):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False))
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_prompted_roi_size_must_be_the_model_input(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = prompted_config(tmp_path / "c.yaml", model="db_sam")
    data = yaml.safe_load(cfg.read_text())
    data["model"]["roi_size"] = [128, 128]
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"model.roi_size \[128, 128\] .* input size is \[64, 64\].*img_size"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False))


def test_dense_training_refuses_settings_it_does_not_use(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "c.yaml", max_val_slices=8)
    with pytest.raises(ConfigError, match=r"'segformer3d' \(dense 3D training.*train.max_val_slices=8 \(default 64\)"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False))
    data = yaml.safe_load(tiny_config(tmp_path / "d.yaml").read_text())
    data["data"]["ct_window"] = [-200, 300]  # the tiny config's preset is mri
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"data.ct_window=\[-200.0, 300.0\] .*ct preset only.*'mri'"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False))


# -- STU-Net --pretrained ----------------------------------------------------------------------------------------------


def _official_checkpoint(path: Path, out_channels: int, dims: tuple[int, ...] = (4, 8, 16, 32, 64, 64)) -> Path:
    """An nnU-Net v2 ``checkpoint_final.pth`` as the STU-Net release writes it, from a tiny STU-Net."""
    torch.manual_seed(123)
    net = STUNet(1, out_channels, dims=dims, depth=(1,) * 6)
    weights = {k: v + 0.01 for k, v in net.state_dict().items()}  # nothing left at a default value
    torch.save({"network_weights": weights, "current_epoch": 4000, "init_args": {"fold": 0}}, path)
    return path


class _InitialWeights(Trainer):
    """Keeps the network's weights as the trainer received them (after ``--pretrained``, before any step)."""

    seen: dict[str, torch.Tensor] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        type(self).seen = {k: v.clone() for k, v in self.model.state_dict().items()}


def test_stunet_pretrained_loads_everything_but_the_heads(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _official_checkpoint(tmp_path / "checkpoint_final.pth", out_channels=105)  # TotalSegmentator classes
    official = torch.load(ckpt, weights_only=True)["network_weights"]
    monkeypatch.setattr(train_pipeline, "Trainer", _InitialWeights)
    cfg = tiny_config(tmp_path / "c.yaml", epochs=1, iters_per_epoch=1, model="stunet_s")
    train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False, pretrained=(ckpt,)))
    seen = _InitialWeights.seen
    assert set(seen) == set(official)
    heads = [k for k in seen if k.startswith("seg_outputs.")]
    assert len(heads) == 10 and all(seen[k].shape[0] == 3 for k in heads)  # the dataset's 3 classes, fresh
    for key in set(seen) - set(heads):
        torch.testing.assert_close(seen[key], official[key], msg=key)
    saved = yaml.safe_load(RunDir(tmp_path / "run").config.read_text())
    assert saved["model"]["pretrained"] == [str(ckpt)]


def test_stunet_pretrained_refuses_another_variant(tiny_dataset: Path, tmp_path: Path) -> None:
    ckpt = _official_checkpoint(tmp_path / "wide.pth", out_channels=3, dims=(8, 16, 32, 64, 128, 128))
    cfg = tiny_config(tmp_path / "c.yaml", epochs=1, iters_per_epoch=1, model="stunet_s")
    with pytest.raises(WeightsError, match=r"mis-shaped: conv_blocks_context\.0\.0\.conv1\.weight.*dims \(8, 16"):
        train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run", show_progress=False, pretrained=(ckpt,)))
    assert not RunDir(tmp_path / "run").last.exists()
