"""Plan configurations (3d_fullres / 3d_lowres / 2d, nnU-Net's rules) and the per-field merge of a config file with
the plan in ``medseg train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.core.config import ExperimentConfig, config_file_keys, load_config
from medseg.core.errors import ConfigError
from medseg.data.fingerprint import CaseFingerprint, ChannelStats, DatasetFingerprint, median_shape_at_spacing
from medseg.models import get_card
from medseg.training.plan import LOWRES_THRESHOLD, MemoryProbe, make_plan, merge_plan
from tests.helpers import tiny_config, write_msd, write_shapes_dataset_2d

PROBE = MemoryProbe(fixed=1e8, per_voxel=2000.0, device="cpu", params=10**6)


def _fingerprint(shape: tuple[int, int, int], spacing: tuple[float, float, float], n: int = 4) -> DatasetFingerprint:
    cases = tuple(CaseFingerprint(f"c{i}", shape, spacing, shape, (100, 10)) for i in range(n))
    channel = ChannelStats("CT", "CT", 50.0, 20.0, 48.0, -90.0, 300.0, -10.0, 120.0, 1000)
    return DatasetFingerprint("d", "CT", ("background", "x"), (channel,), cases, digest="abc")


def test_large_images_get_a_3d_lowres_alternative() -> None:
    fp = _fingerprint((512, 512, 400), (0.8, 0.8, 1.0))
    full = make_plan(fp, "unet", memory_gib=2.0, probe=PROBE)
    assert full.configuration == "3d_fullres" and "3d_lowres" in full.alternatives
    low = full.alternatives["3d_lowres"]
    # nnU-Net's stopping rule: the low-res patch covers at least a quarter of the median image at its spacing
    median_low = median_shape_at_spacing(fp, low["target_spacing"])
    assert np.prod(low["patch_size"]) / np.prod(median_low) >= LOWRES_THRESHOLD
    assert np.prod(full.patch_size) / np.prod(full.median_shape) < LOWRES_THRESHOLD
    # the anisotropic axes grow first: 0.8 mm axes until within 2x of 1.0, then all alike, so x and y stay equal
    assert low["target_spacing"][0] == low["target_spacing"][1] > full.target_spacing[0]
    chosen = make_plan(fp, "unet", memory_gib=2.0, probe=PROBE, configuration="3d_lowres")
    assert chosen.configuration == "3d_lowres" and list(chosen.target_spacing) == low["target_spacing"]
    assert list(chosen.patch_size) == low["patch_size"] and "3d_fullres" in chosen.alternatives
    assert "also: 3d_fullres" in chosen.table()


def test_small_images_get_no_lowres() -> None:
    fp = _fingerprint((64, 64, 48), (1.0, 1.0, 1.0))
    plan = make_plan(fp, "unet", memory_gib=4.0, probe=PROBE)
    assert plan.alternatives == {}
    with pytest.raises(ConfigError, match="no 3d_lowres configuration.*already covers a quarter"):
        make_plan(fp, "unet", memory_gib=4.0, probe=PROBE, configuration="3d_lowres")


def test_2d_configuration_belongs_to_2d_models() -> None:
    fp = _fingerprint((96, 80, 30), (0.7, 0.7, 5.0))
    plan = make_plan(fp, "unet2d", memory_gib=4.0, probe=PROBE)
    div = get_card("unet2d").divisible_by
    assert plan.configuration == "2d" and plan.spatial_dims == 2 and len(plan.patch_size) == 2
    assert all(p % d == 0 for p, d in zip(plan.patch_size, div, strict=False)) and plan.alternatives == {}
    with pytest.raises(ConfigError, match="configuration '2d' does not fit model 'unet'"):
        make_plan(fp, "unet", memory_gib=4.0, probe=PROBE, configuration="2d")
    with pytest.raises(ConfigError, match="'3d_lowres' does not fit model 'unet2d'"):
        make_plan(fp, "unet2d", memory_gib=4.0, probe=PROBE, configuration="3d_lowres")


def test_fixed_patch_gets_a_batch_fitted_around_it() -> None:
    fp = _fingerprint((160, 160, 160), (1.0, 1.0, 1.0), n=40)
    free = make_plan(fp, "unet", memory_gib=8.0, probe=PROBE)
    fixed = make_plan(fp, "unet", memory_gib=8.0, probe=PROBE, patch_size=(64, 64, 64))
    assert fixed.patch_size == (64, 64, 64) and fixed.batch_size > free.batch_size
    assert PROBE.bytes(fixed.patch_size, fixed.batch_size) <= 8.0 * 2**30
    kept = make_plan(fp, "unet", memory_gib=8.0, probe=PROBE, patch_size=(64, 64, 64), batch_size=3, spacing=(2, 2, 2))
    assert kept.batch_size == 3 and kept.target_spacing == (2.0, 2.0, 2.0)


def test_merge_keeps_what_the_file_states(tmp_path: Path) -> None:
    fp = _fingerprint((64, 64, 40), (1.0, 1.0, 3.0))
    plan = make_plan(fp, "unet", memory_gib=4.0, probe=PROBE)
    assert plan.preset == "ct_fingerprint"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"spacing": None}, "model": {"roi_size": [32, 32, 32]}}))
    given = {k: "--config c.yaml" for k in config_file_keys(path)}
    assert set(given) == {"data.spacing", "model.roi_size"}  # only what the file says, not the defaults
    cfg, sources = merge_plan(plan, load_config(path), given)
    assert cfg.data.spacing is None and cfg.model.roi_size == (32, 32, 32)  # null states "each image's own"
    assert cfg.data.preset == "ct_fingerprint" and cfg.data.intensity[0].high == 120.0
    assert cfg.train.batch_size == plan.batch_size and cfg.train.fg_ratio == 0.33
    assert sources["model.roi_size"] == "--config c.yaml" and sources["data.preset"] == "plan"
    # a preset the file gives takes the plan's CT numbers with it only when it is the plan's own preset
    cfg, sources = merge_plan(plan, ExperimentConfig().updated({"data": {"preset": "zscore"}}), {"data.preset": "f"})
    assert cfg.data.preset == "zscore" and cfg.data.intensity == () and "follows" in sources["data.intensity"]


def _stop_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import train as train_mod

    class Stop(Exception):
        pass

    def stop(self: object) -> None:
        raise Stop

    monkeypatch.setattr(train_mod.Trainer, "fit", stop)
    return Stop  # type: ignore[return-value]


def test_train_with_a_config_plans_what_it_leaves_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import train as train_mod

    stop = _stop_training(monkeypatch)
    root = write_msd(tmp_path / "msd", n_cases=3)
    cfg_path = tiny_config(tmp_path / "c.yaml", model="unet")  # preset, roi_size and batch_size, no spacing
    run = tmp_path / "run"
    with pytest.raises(stop):
        train_mod.train(train_mod.TrainRequest(root, config=cfg_path, out=run, show_progress=False))
    plan = json.loads((run / "plan.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert list(cfg.data.spacing) == pytest.approx(plan["target_spacing"]) and cfg.train.fg_ratio == 0.33
    assert cfg.model.roi_size == (32, 32, 32) and cfg.train.batch_size == 2 and cfg.data.preset == "mri"
    assert plan["patch_size"] == [32, 32, 32]  # the plan was fitted around the file's patch
    assert plan["sources"]["data.spacing"] == "plan" and plan["sources"]["model.roi_size"] == f"--config {cfg_path}"
    header = (run / "config.yaml").read_text().splitlines()[:8]
    assert any("data.spacing: plan" in line for line in header)
    # --no-plan: the file as it is
    run2 = tmp_path / "run2"
    with pytest.raises(stop):
        train_mod.train(train_mod.TrainRequest(root, config=cfg_path, out=run2, show_progress=False, plan=False))
    assert load_config(run2 / "config.yaml").data.spacing is None and not (run2 / "plan.json").exists()


def test_train_2d_model_plans_a_2d_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import train as train_mod

    stop = _stop_training(monkeypatch)
    root = write_shapes_dataset_2d(tmp_path / "shapes")
    run = tmp_path / "run"
    with pytest.raises(stop):
        train_mod.train(train_mod.TrainRequest(root, model="unet2d", out=run, show_progress=False))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["configuration"] == "2d" and len(plan["patch_size"]) == 2
    assert list(load_config(run / "config.yaml").model.roi_size) == plan["patch_size"]


def _dense_models() -> list[str]:
    from medseg.models import list_models

    return [n for n in list_models() if get_card(n).task == "segmentation" and not get_card(n).needs_prompts]


#: One 3D and both 2D families run in the default suite; the rest (same code path, more minutes) are marked slow.
_DEFAULT_DENSE = {"unet", "unet2d", "medvit2_seg_tiny"}


@pytest.mark.parametrize(
    "model",
    [m if m in _DEFAULT_DENSE else pytest.param(m, marks=pytest.mark.slow) for m in _dense_models()],
)
def test_every_dense_model_trains_from_a_bare_folder(model: str, tmp_path: Path) -> None:
    """A config that states only the tiny variant and a short schedule: the plan fills every data-dependent field."""
    from medseg.models import tiny_overrides
    from pipelines import train as train_mod

    card = get_card(model)
    root = write_shapes_dataset_2d(tmp_path / "d") if card.spatial_dims == 2 else write_msd(tmp_path / "d", 3)
    cfg_path = tmp_path / "c.yaml"
    schedule = {"epochs": 1, "iters_per_epoch": 2, "warmup_iters": 1, "val_every": 1}
    cfg_path.write_text(yaml.safe_dump({"model": {"kwargs": tiny_overrides(model)}, "train": schedule}))
    run = tmp_path / "run"
    result = train_mod.train(train_mod.TrainRequest(root, model=model, config=cfg_path, out=run, show_progress=False))
    plan = json.loads((run / "plan.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert result.steps == 2 and result.best_mean_dice is not None
    assert set(plan["sources"].values()) == {"plan"} and list(cfg.model.roi_size) == plan["patch_size"]
    low = card.min_size or (1,) * card.spatial_dims
    assert all(p % d == 0 and p >= m for p, d, m in zip(plan["patch_size"], card.divisible_by, low, strict=False))
