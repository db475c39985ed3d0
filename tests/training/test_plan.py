"""Training plans: nnU-Net's spacing and normalisation rules, measured memory, patch/batch search, the ct_fingerprint
preset, ``medseg plan`` and ``medseg train`` without a config."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor

from medseg.core.config import ChannelIntensity, DataConfig, ExperimentConfig, load_config, validate_config
from medseg.core.errors import ConfigError
from medseg.data import load_manifest
from medseg.data.fingerprint import CaseFingerprint, ChannelStats, DatasetFingerprint, compute_fingerprint
from medseg.models import get_card, tiny_overrides
from medseg.training.plan import (
    MemoryProbe,
    Plan,
    check_preset_modality,
    make_plan,
    normalisation,
    probe_memory,
    target_spacing,
)
from medseg.transforms.presets import preprocessing_for
from tests.helpers import run_cli, tiny_config, write_msd


def _fingerprint(
    spacings: list[tuple[float, float, float]],
    shapes: list[tuple[int, int, int]],
    modality: str = "CT",
    crop_share: float = 1.0,
) -> DatasetFingerprint:
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i}",
            shape=tuple(int(round(n / crop_share ** (1 / 3))) for n in shape),
            spacing=sp,
            shape_after_crop=shape,
            class_voxels=(100, 10),
        )
        for i, (sp, shape) in enumerate(zip(spacings, shapes, strict=True))
    )
    channel = ChannelStats(modality, modality, 50.0, 20.0, 48.0, -90.0, 300.0, -10.0, 120.0, 1000)
    return DatasetFingerprint("d", modality, ("background", "x"), (channel,), cases, digest="abc")


def test_target_spacing_is_the_median() -> None:
    fp = _fingerprint([(1.0, 1.0, 2.0), (0.8, 0.8, 2.5), (1.2, 1.2, 1.5)], [(100, 100, 50)] * 3)
    assert target_spacing(fp) == ((1.0, 1.0, 2.0), False)


def test_anisotropic_axis_takes_the_10th_percentile() -> None:
    z = [10.0, 8.0, 6.0, 5.0, 10.0]
    fp = _fingerprint([(1.5, 1.5, s) for s in z], [(200, 200, 15)] * 5)
    spacing, aniso = target_spacing(fp)
    assert aniso and spacing[:2] == (1.5, 1.5)
    assert spacing[2] == pytest.approx(np.percentile(z, 10)) and spacing[2] < np.median(z)
    # coarse spacing but as many voxels on that axis: the median stays (nnU-Net needs both conditions)
    fp = _fingerprint([(1.5, 1.5, s) for s in z], [(200, 200, 150)] * 5)
    assert target_spacing(fp) == ((1.5, 1.5, 8.0), False)


def test_normalisation_from_modality() -> None:
    preset, stats = normalisation(_fingerprint([(1, 1, 1)], [(10, 10, 10)], "CT"))
    assert preset == "ct_fingerprint"
    assert stats == ({"low": -10.0, "high": 120.0, "mean": 50.0, "std": 20.0},)
    assert normalisation(_fingerprint([(1, 1, 1)], [(10, 10, 10)], "MRI")) == ("zscore", ())
    assert normalisation(_fingerprint([(1, 1, 1)], [(10, 10, 10)], "MRI", crop_share=0.5)) == ("mri", ())


def test_ct_fingerprint_preset_applies_the_plans_numbers_not_the_images() -> None:
    data = DataConfig(preset="ct_fingerprint", intensity=(ChannelIntensity(low=-10, high=120, mean=50, std=20),))
    values = torch.tensor([-500.0, -10.0, 50.0, 90.0, 120.0, 4000.0]).reshape(1, 6, 1, 1)
    image = MetaTensor(values, affine=torch.eye(4))
    out = preprocessing_for(data, "ct", with_label=False, load=False)({"image": image})["image"]
    expected = (np.clip(values.numpy(), -10, 120) - 50) / 20
    assert np.allclose(np.asarray(out), expected, atol=1e-6)
    # the image's own statistics play no part: a shifted image gives shifted outputs
    shifted = preprocessing_for(data, "ct", with_label=False, load=False)({"image": MetaTensor(values + 30.0)})
    assert np.allclose(np.asarray(shifted["image"]).ravel()[1:4], [(20 - 50) / 20, (80 - 50) / 20, (120 - 50) / 20])
    with pytest.raises(ConfigError, match="needs data.intensity"):
        validate_config({"data": {"preset": "ct_fingerprint"}})
    with pytest.raises(ConfigError, match="ct_fingerprint preset only"):
        ExperimentConfig().updated({"data": {"preset": "mri", "intensity": [dict(low=0, high=1, mean=0, std=1)]}})


def test_probe_scales_with_patch_and_batch() -> None:
    probe = probe_memory("unet", 1, ("bg", "a"), model_kwargs=tiny_overrides("unet"))
    assert probe.per_voxel > 0 and probe.fixed >= 16 * probe.params > 0 and probe.device == "cpu"
    assert probe.bytes((64, 64, 64), 2) > probe.bytes((32, 32, 64), 2) > probe.bytes((32, 32, 64), 1)


def test_patch_and_batch_follow_the_budget() -> None:
    fp = _fingerprint([(1.0, 1.0, 1.0)] * 4, [(160, 160, 160)] * 4, "MRI")
    probe = MemoryProbe(fixed=1e8, per_voxel=2000.0, device="cpu", params=10**6)
    big = make_plan(fp, "unet", memory_gib=32.0, probe=probe)
    small = make_plan(fp, "unet", memory_gib=1.0, probe=probe)
    div = get_card("unet").divisible_by
    for plan in (big, small):
        assert all(p % d == 0 for p, d in zip(plan.patch_size, div, strict=True))
        assert plan.estimated_gib <= plan.memory_budget_gib and plan.batch_size >= 2
        assert probe.bytes(plan.patch_size, plan.batch_size) <= plan.memory_budget_gib * 2**30
    assert big.patch_size == (160, 160, 160)  # capped at the median shape
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    # the batch covers at most 5 % of the dataset's voxels
    assert big.batch_size == 2
    with pytest.raises(ConfigError, match="does not fit 0.05 GiB"):
        make_plan(fp, "unet", memory_gib=0.05, probe=probe)


def test_plan_round_trip_and_config(tmp_path: Path) -> None:
    fp = _fingerprint([(1.0, 1.0, 3.0)] * 2, [(64, 64, 40)] * 2, "CT")
    plan = make_plan(fp, "unet", memory_gib=4.0, probe=MemoryProbe(1e8, 1000.0, "cpu", 10))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    cfg = plan.apply(ExperimentConfig())
    assert cfg.data.spacing == plan.target_spacing and cfg.model.roi_size == plan.patch_size
    assert cfg.data.preset == "ct_fingerprint" and cfg.data.intensity[0].high == 120.0
    assert cfg.train.batch_size == plan.batch_size and cfg.train.fg_ratio == 0.33
    assert "clip [-10, 120]" in plan.table()
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())  # what a run saves and the predictor reads back
    assert load_config(tmp_path / "config.yaml") == cfg


def test_ct_preset_on_mri_data_is_refused() -> None:
    with pytest.raises(ConfigError, match="normalises as CT, but the dataset declares modality 'MRI'.*force_preset"):
        check_preset_modality("ct", "MRI")
    check_preset_modality("ct", "MRI", force=True)
    check_preset_modality("mri", "MRI")
    check_preset_modality("ct", "CT")


def test_plan_of_a_real_dataset(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "msd", n_cases=3)
    fp = compute_fingerprint(load_manifest(root), max_samples=3000)
    plan = make_plan(fp, "unet", memory_gib=2.0, model_kwargs=tiny_overrides("unet"))
    assert plan.preset == "zscore" and plan.channel_modalities == ("MRI",)
    assert plan.target_spacing == pytest.approx((1.2, 1.0, 1.5), rel=1e-6)
    assert max(plan.patch_size) >= 64  # one axis twice the divisor: the bottleneck is not one voxel


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_msd(tmp_path / "msd", n_cases=2)
    code, out = run_cli(["plan", str(root), "--model", "segformer3d", "--memory-gib", "2"], capsys, monkeypatch)
    assert code == 0, out
    saved = json.loads((root / "plan.json").read_text())
    assert saved["model"] == "segformer3d" and saved["preset"] == "zscore" and "patch size" in out
    assert (root / "medseg_fingerprint.json").is_file()
    code, out = run_cli(["plan", str(root), "--model", "db_sam"], capsys, monkeypatch)
    assert code == 1 and "not a dense segmentation model" in out


class _Stop(Exception):
    pass


def test_train_without_config_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import train as train_mod

    def stop(self: object) -> None:
        raise _Stop

    monkeypatch.setattr(train_mod.Trainer, "fit", stop)
    root = write_msd(tmp_path / "msd", n_cases=3)
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        train_mod.train(train_mod.TrainRequest(root, model="segformer3d", out=run, show_progress=False))
    plan = json.loads((run / "plan.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert cfg.data.preset == plan["preset"] == "zscore"  # not the MRI-as-CT trap
    assert list(cfg.data.spacing) == pytest.approx(plan["target_spacing"])
    assert list(cfg.model.roi_size) == plan["patch_size"] and cfg.train.batch_size == plan["batch_size"]
    assert plan["sources"]["data.spacing"] == "plan"


def test_train_refuses_ct_preset_on_mri_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import train as train_mod

    root = write_msd(tmp_path / "msd", n_cases=2)
    cfg_path = tiny_config(tmp_path / "c.yaml", model="unet")
    data = yaml.safe_load(cfg_path.read_text())
    data["data"]["preset"] = "ct"
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'ct' \\(data.preset\\) normalises as CT.*'MRI'"):
        train_mod.train(train_mod.TrainRequest(root, config=cfg_path, out=tmp_path / "r", show_progress=False))
    assert not (tmp_path / "r").exists()
    data["data"]["force_preset"] = True
    cfg_path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(train_mod.Trainer, "fit", lambda self: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        train_mod.train(train_mod.TrainRequest(root, config=cfg_path, out=tmp_path / "r", show_progress=False))


def test_card_default_ct_preset_on_mri_data_is_refused(tmp_path: Path) -> None:
    from pipelines import train as train_mod

    root = write_msd(tmp_path / "msd", n_cases=2)
    cfg_path = tiny_config(tmp_path / "c.yaml", model="unet")
    data = yaml.safe_load(cfg_path.read_text())
    del data["data"]["preset"]  # unet's card says ct
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="the default of model 'unet'"):  # --no-plan: the card's default stays
        train_mod.train(
            train_mod.TrainRequest(root, config=cfg_path, out=tmp_path / "r", show_progress=False, plan=False)
        )


def test_fingerprint_replace_keeps_frozen() -> None:
    fp = _fingerprint([(1.0, 1.0, 1.0)], [(8, 8, 8)])
    assert replace(fp, digest="x").digest == "x" and fp.digest == "abc"


# ---------------------------------------------------------------------------------------------- nnU-Net agreement


def _anisotropic_ct(root: Path, z_spacings: tuple[float, ...] = (4.0, 5.0, 6.0, 3.5, 5.0)) -> Path:
    """CT-like cases (HU-ish values) of 40 x 36 x 10 voxels at 0.8 x 0.8 x z mm: nnU-Net's anisotropic case."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, z in enumerate(z_spacings):
        shape = (40, 36, 10)
        label = np.zeros(shape, np.uint8)
        label[10:25, 8:20, 3:7] = 1
        image = rng.normal(-50.0, 30.0, shape).astype(np.float32)
        image[label == 1] = rng.normal(120.0, 40.0, int(label.sum()))
        affine = np.diag([0.8, 0.8, z, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"ct_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"ct_{i}.nii.gz")
        training.append({"image": f"./imagesTr/ct_{i}.nii.gz", "label": f"./labelsTr/ct_{i}.nii.gz"})
    meta = {"name": "aniso", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training, "test": []}))
    return root


@pytest.mark.integration
def test_plan_agrees_with_nnunet_planner(tmp_path: Path) -> None:
    import importlib

    from medseg.integrations.nnunet import export_nnunet_raw
    from tests.data.test_fingerprint import _nnunet_fingerprint

    data = _anisotropic_ct(tmp_path / "ct")
    folder = export_nnunet_raw(data, tmp_path / "raw", 502)
    max_samples = 50_000
    _nnunet_fingerprint(tmp_path / "raw", folder, tmp_path / "pre", max_samples)
    planner_mod = importlib.import_module("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner")
    patch = pytest.MonkeyPatch()
    patch.setattr(planner_mod, "nnUNet_raw", str(tmp_path / "raw"))
    patch.setattr(planner_mod, "nnUNet_preprocessed", str(tmp_path / "pre"))
    try:
        theirs = planner_mod.ExperimentPlanner(folder.name).plan_experiment()
    finally:
        patch.undo()
    fullres = theirs["configurations"]["3d_fullres"]
    fp = compute_fingerprint(load_manifest(folder), max_samples=max_samples)
    plan = make_plan(fp, "unet", memory_gib=4.0, model_kwargs=tiny_overrides("unet"))
    # nnU-Net's axes are (Z, Y, X): medseg's RAS (X, Y, Z) reversed for these RAS-stored files
    assert plan.anisotropic
    assert plan.target_spacing[::-1] == pytest.approx(fullres["spacing"], rel=1e-6)
    assert fullres["normalization_schemes"] == ["CTNormalization"] and plan.preset == "ct_fingerprint"
    props = theirs["foreground_intensity_properties_per_channel"]["0"]
    mine = plan.intensity[0]
    for key, theirs_key in (("low", "percentile_00_5"), ("high", "percentile_99_5"), ("mean", "mean"), ("std", "std")):
        assert mine[key] == pytest.approx(props[theirs_key], rel=1e-5), key
    # same shape class: 3D patches covering the median shape at the target spacing; nnU-Net's coarse axis may go
    # below medseg's card divisor (it drops poolings per axis, a card's divisibility is fixed): docs/planning.md
    assert list(fullres["median_image_size_in_voxels"])[::-1] == pytest.approx(plan.median_shape, abs=1.0)
    assert len(fullres["patch_size"]) == len(plan.patch_size) == 3
    div = np.array(get_card("unet").divisible_by)
    theirs_xyz = np.array(fullres["patch_size"][::-1])
    assert np.all(np.abs(np.array(plan.patch_size) - np.maximum(theirs_xyz, div)) <= div)


def test_predictor_applies_the_plans_ct_numbers() -> None:
    from medseg.inference.predictor import Predictor
    from medseg.models import create_model

    plan_cfg = ExperimentConfig().updated(
        {
            "data": {"preset": "ct_fingerprint", "intensity": [dict(low=-100.0, high=300.0, mean=40.0, std=80.0)]},
            "model": {"name": "unet", "roi_size": [32, 32, 64], "kwargs": tiny_overrides("unet")},
        }
    )
    model = create_model("unet", in_channels=1, roi_size=(32, 32, 64), **tiny_overrides("unet"))
    predictor = Predictor(model, plan_cfg, device="cpu")
    values = torch.tensor([-1000.0, 40.0, 200.0, 3000.0]).reshape(1, 4, 1, 1)
    out = predictor.preprocess({"image": MetaTensor(values, affine=torch.eye(4))})["image"]
    assert np.allclose(np.asarray(out).ravel(), [(-100 - 40) / 80, 0.0, (200 - 40) / 80, (300 - 40) / 80], atol=1e-6)


def test_a_ct_dataset_trains_with_the_plans_ct_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config, CT data: the trainer's training and validation transforms both normalise with the plan's numbers."""
    from medseg.transforms.presets import FingerprintCTNormalized
    from pipelines import train as train_mod

    seen: dict[str, object] = {}

    def stop(self: object) -> None:
        seen["trainer"] = self
        raise _Stop

    monkeypatch.setattr(train_mod.Trainer, "fit", stop)
    root = write_msd(tmp_path / "msd", n_cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(_Stop):
        train_mod.train(train_mod.TrainRequest(root, model="segformer3d", out=tmp_path / "run", show_progress=False))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["preset"] == "ct_fingerprint"
    trainer = seen["trainer"]
    for dataset in (trainer.train_ds, trainer.val_ds):  # type: ignore[attr-defined]
        steps = [t for t in dataset.transform.transforms if isinstance(t, FingerprintCTNormalized)]
        assert len(steps) == 1, [type(t).__name__ for t in dataset.transform.transforms]
        assert steps[0].stats[0].mean == pytest.approx(plan["intensity"][0]["mean"])
