"""nnU-Net v2 export (file names, dataset.json, exact geometry), the torchvision shim in a fresh interpreter, STU-Net
trainer discovery through ``nnUNet_extTrainer``, the trainers' networks, and bad results folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.core.errors import ConfigError, DataError, WeightsError
from medseg.integrations.nnunet import TRAINER_DIR
from medseg.integrations.nnunet.export import export_nnunet_raw
from medseg.integrations.nnunet.shim import ensure_nnunet_importable
from medseg.io import load_image
from tests.helpers import make_case, tiny_affine, write_msd

ROOT = Path(__file__).resolve().parents[2]


def _same(a: Path, b: Path) -> None:
    img_a, img_b = load_image(a), load_image(b)
    assert img_a.shape == img_b.shape
    np.testing.assert_array_equal(img_a.numpy(), img_b.numpy())
    np.testing.assert_array_equal(np.asarray(img_a.affine), np.asarray(img_b.affine))


def test_export_msd_layout(tmp_path: Path) -> None:
    data = write_msd(tmp_path / "msd", n_cases=3)
    out = export_nnunet_raw(data, tmp_path / "raw", 501)
    assert out == tmp_path / "raw" / "Dataset501_tiny"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"case_0{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"case_0{i}.nii.gz" for i in range(3)]
    assert not (out / "imagesTs").exists()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "sphere": 1, "box": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz" and meta["name"] == "tiny"
    for i in range(3):
        _same(data / "imagesTr" / f"case_0{i}.nii.gz", out / "imagesTr" / f"case_0{i}_0000.nii.gz")
        _same(data / "labelsTr" / f"case_0{i}.nii.gz", out / "labelsTr" / f"case_0{i}.nii.gz")
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_export_splits_4d_channels_and_keeps_test_cases(tmp_path: Path) -> None:
    """A 2-channel MSD image (one 4D file) becomes _0000/_0001 files; imagesTs/ gets the test case."""
    root = tmp_path / "Task09_Two"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    rng = np.random.default_rng(1)
    affine = tiny_affine()
    images = {}
    for cid in ("a_1", "a_2", "t_1"):
        image, label = make_case(rng, (12, 10, 8))
        images[cid] = np.stack([image, 2 * image], -1)
        folder = "imagesTs" if cid.startswith("t") else "imagesTr"
        nib.save(nib.Nifti1Image(images[cid], affine), root / folder / f"{cid}.nii.gz")
        if folder == "imagesTr":
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{cid}.nii.gz")
    meta = {
        "name": "Two channels!",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("a_1", "a_2")],
        "test": ["./imagesTs/t_1.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    out = export_nnunet_raw(root, tmp_path / "raw", 7)
    assert out.name == "Dataset007_Two_channels"
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["t_1_0000.nii.gz", "t_1_0001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "T2", "1": "ADC"}
    for c in range(2):
        written = load_image(out / "imagesTr" / f"a_2_{c:04d}.nii.gz")
        np.testing.assert_array_equal(written.numpy()[0], images["a_2"][..., c])
        np.testing.assert_allclose(np.asarray(written.affine), affine, rtol=0, atol=1e-6)


def test_export_refuses_bad_ids_names_and_existing_folders(tmp_path: Path) -> None:
    data = write_msd(tmp_path / "msd", n_cases=1)
    for bad in (0, 1000, True, "501"):
        with pytest.raises(ConfigError, match="1 to 999"):
            export_nnunet_raw(data, tmp_path / "raw", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not allowed"):
        export_nnunet_raw(data, tmp_path / "raw", 502, name="has space")
    (tmp_path / "raw" / "Dataset502_Other").mkdir(parents=True)
    with pytest.raises(ConfigError, match="Dataset502_Other already exists"):
        export_nnunet_raw(data, tmp_path / "raw", 502)


def test_export_refuses_label_on_another_grid(tmp_path: Path) -> None:
    data = write_msd(tmp_path / "msd", n_cases=1)
    label = data / "labelsTr" / "case_00.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), tiny_affine()), label)
    with pytest.raises(DataError, match="another grid"):
        export_nnunet_raw(data, tmp_path / "raw", 501)
    assert not (tmp_path / "raw" / "Dataset501_tiny").exists()


def test_shim_imports_nnunet_and_ext_trainer_lookup_finds_stunet() -> None:
    """In a fresh interpreter: the shim (twice) makes nnunetv2 and timm/torchvision import with the CPU torch, and
    nnU-Net's own trainer lookup finds STUNetTrainer_*_ft through nnUNet_extTrainer (what nnUNetv2_train uses)."""
    code = (
        "from medseg.integrations.nnunet.shim import ensure_nnunet_importable as e\n"
        "e(); e()\n"
        "import timm, torchvision, nnunetv2\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "cls = find('STUNetTrainer_small_ft')\n"
        "print('FOUND', cls.__module__, cls.__name__, cls.stunet_initial_lr)\n"
    )
    env = {**os.environ, "nnUNet_extTrainer": str(TRAINER_DIR)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FOUND medseg.integrations.nnunet.trainers STUNetTrainer_small_ft 0.001" in proc.stdout


def test_trainer_builds_stunet_from_plans() -> None:
    ensure_nnunet_importable()
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from medseg.integrations.nnunet.trainers import (
        STUNetTrainer,
        STUNetTrainer_base_ft,
        STUNetTrainer_small,
        STUNetTrainer_tiny,
    )
    from medseg.models.stunet import STUNet

    total_seg = ConfigurationManager(
        {
            "patch_size": [128, 128, 128],
            "architecture": {"arch_kwargs": {"strides": [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 1, 2]]}},
        }
    )
    net = STUNetTrainer_small.build_network_architecture(None, total_seg, 1, 105, enable_deep_supervision=True)
    assert isinstance(net, STUNet) and sum(p.numel() for p in net.parameters()) == 14_596_941
    assert STUNetTrainer_small.stunet_initial_lr == 1e-2 and STUNetTrainer_base_ft.stunet_initial_lr == 1e-3
    # A shallow plan (3 pools, anisotropic) is padded to STU-Net's 5 pools; nnU-Net outputs: list at native sizes.
    shallow = ConfigurationManager(
        {
            "patch_size": [40, 28, 32],
            "architecture": {"arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 1, 2]]}},
        }
    )
    tiny = STUNetTrainer_tiny.build_network_architecture(None, shallow, 2, 3, True).train()
    outs = tiny(torch.zeros(1, 2, 40, 28, 32))
    sizes = [(40, 28, 32), (20, 14, 16), (10, 7, 8), (5, 7, 4), (5, 7, 4)]
    assert [tuple(o.shape[2:]) for o in outs] == sizes
    # nnU-Net downsamples the targets by these scales: one per STU-Net output, matching the output sizes.
    fake_trainer = SimpleNamespace(enable_deep_supervision=True, configuration_manager=shallow)
    scales = STUNetTrainer._get_deep_supervision_scales(fake_trainer)
    assert [tuple(int(p * s) for p, s in zip((40, 28, 32), sc, strict=True)) for sc in scales] == sizes
    tiny.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled toggles
    assert tiny.eval()(torch.zeros(1, 2, 40, 28, 32)).shape == (1, 3, 40, 28, 32)
    with pytest.raises(ConfigError, match="3D configuration"):
        STUNetTrainer_tiny.build_network_architecture(
            None, ConfigurationManager({"patch_size": [64, 64], "architecture": {"arch_kwargs": {"strides": []}}}), 1, 2
        )


def test_bad_results_folders_name_the_missing_file(tmp_path: Path) -> None:
    from medseg.integrations.nnunet.results import NnUNetResultsPredictor

    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    with pytest.raises(ConfigError, match="does not exist"):
        NnUNetResultsPredictor.from_folder(folder)
    folder.mkdir()
    with pytest.raises(ConfigError, match="plans.json not found") as err:
        NnUNetResultsPredictor.from_folder(folder)
    assert err.value.path == str(folder / "plans.json")
    (folder / "plans.json").write_text("{}")
    with pytest.raises(ConfigError, match="dataset.json not found"):
        NnUNetResultsPredictor.from_folder(folder)
    (folder / "dataset.json").write_text("{}")
    (folder / "fold_1").mkdir()
    with pytest.raises(WeightsError, match="fold_0 not found.*available: fold_1"):
        NnUNetResultsPredictor.from_folder(folder, fold=0)
    with pytest.raises(WeightsError, match="checkpoint_final.pth not found"):
        NnUNetResultsPredictor.from_folder(folder, fold=1)
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read .*checkpoint_final.pth"):
        NnUNetResultsPredictor.from_folder(folder, fold=1)
    torch.save({"network_weights": {}}, folder / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(WeightsError, match="not an nnU-Net v2 checkpoint .*trainer_name"):
        NnUNetResultsPredictor.from_folder(folder, fold=1)


def test_run_nnunet_refuses_bad_requests_before_training(tmp_path: Path) -> None:
    from medseg.integrations.nnunet.runner import run_nnunet, trainer_name_for

    assert trainer_name_for("stunet_s") == "STUNetTrainer_small"
    assert trainer_name_for("nnUNetTrainer_250epochs") == "nnUNetTrainer_250epochs"
    with pytest.raises(ConfigError, match="did you mean stunet_s"):
        trainer_name_for("stunet_x")
    data = write_msd(tmp_path / "msd", n_cases=4)
    with pytest.raises(ConfigError, match="epochs is 0"):
        run_nnunet(data, tmp_path / "work", epochs=0)
    with pytest.raises(ConfigError, match="4 training case.*5-fold"):
        run_nnunet(data, tmp_path / "work", fold=0)
    other = write_msd(tmp_path / "other", n_cases=4, seed=3)
    with pytest.raises(ConfigError, match="holds another dataset"):
        run_nnunet(other, tmp_path / "work", fold="all")


def test_cli_export_and_trainer_path(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.nnunet_cli import nnunet_app, parse_fold

    data = write_msd(tmp_path / "msd", n_cases=2)
    runner = CliRunner()
    result = runner.invoke(nnunet_app, ["export", str(data), "--id", "42", "--name", "Tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Dataset042_Tiny" / "dataset.json").is_file()
    again = runner.invoke(nnunet_app, ["export", str(data), "--id", "42", "--out", str(tmp_path)])
    assert isinstance(again.exception, ConfigError)  # pipelines.cli.main prints it as one line
    assert runner.invoke(nnunet_app, ["trainer-path"]).output.strip() == str(TRAINER_DIR)
    assert (TRAINER_DIR / "medseg_stunet_trainers.py").is_file()
    assert parse_fold("all") == "all" and parse_fold("3") == 3
    with pytest.raises(ConfigError, match="not a fold"):
        parse_fold("5")


def test_reorienting_reader_round_trip() -> None:
    """Plans made with NibabelIOWithReorient: the image is brought to RAS axes as nibabel does, and back."""
    from medseg.integrations.nnunet.results import _canonical_orientation

    affine = np.diag([-1.2, 1.0, -1.5, 1.0])[:, [1, 0, 2, 3]]  # axes swapped and flipped
    data = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    to_ras, from_ras, spacing = _canonical_orientation(affine)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data[0], affine))
    np.testing.assert_array_equal(to_ras(data)[0], np.asarray(canonical.dataobj))
    np.testing.assert_allclose(spacing, canonical.header.get_zooms())
    np.testing.assert_array_equal(from_ras(to_ras(data)), data)
