"""Prompted SAM models end to end through the command line: box-prompted training on a 2D PNG dataset, prediction
on 2D images and slice-wise on 3D volumes with voxel or RAS prompts, and the errors for missing or bad prompts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.inference.rundir import RunDir, load_checkpoint
from tests.helpers import make_case, run_cli, tiny_affine


def test_prompted_training_writes_a_full_run(prompted_run: Path) -> None:
    run = RunDir(prompted_run)
    card = json.loads(run.card.read_text())
    assert card["name"] == "sam_unet_r34" and card["needs_prompts"] and card["roi_size"] == [64, 64]
    records = run.read_metrics()
    assert records and np.isfinite(records[-1]["train_loss"])
    assert set(records[-1]["val_dice"]) <= {"disc", "square"} and 0.0 <= records[-1]["val_mean_dice"] <= 1.0
    ckpt = load_checkpoint(run.best)
    frozen = [k for k in ckpt["model"] if k.startswith("image_encoder.")]
    assert frozen, "the frozen SAM encoder is part of the run's weights (the run dir is self-contained)"


def test_predict_png_with_a_box(prompted_run: Path, shapes_2d: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image = shapes_2d / "images" / "img_00.png"
    args = ["predict", str(prompted_run), str(image), "--out", str(tmp_path), "--box", "20,14,45,36", "--format", "png"]
    code, out = run_cli(args, capsys, monkeypatch)
    assert code == 0, out
    mask = np.asarray(Image.open(tmp_path / "img_00_seg.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape
    assert set(np.unique(mask)) <= {0, 1}
    stats = json.loads((tmp_path / "img_00_seg.json").read_text())
    assert stats["label_names"] == ["background", "object_1"]


def test_predict_volume_slice_wise_in_ras(prompted_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image, _ = make_case(np.random.default_rng(3))
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(image, tiny_affine()), path)
    lo, hi = np.array([4, 5, 10]), np.array([20, 22, 14])
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ras = (tiny_affine() @ corners.T).T[:, :3]
    box = ",".join(f"{v:.3f}" for v in (*ras[:, 0:2].min(0), *ras[:, 0:2].max(0), ras[:, 2].min(), ras[:, 2].max()))
    args = ["predict", str(prompted_run), str(path), "--out", str(tmp_path / "out"), "--box", box, "--coords", "ras"]
    code, out = run_cli(args, capsys, monkeypatch)
    assert code == 0, out
    mask = nib.load(tmp_path / "out" / "vol_seg.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, tiny_affine(), atol=1e-5)
    data = np.asarray(mask.dataobj)
    assert not data[:, :, :10].any() and not data[:, :, 15:].any(), "only the slices the box spans are segmented"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "is prompted"),
        (["--box", "40,10,20,30"], "x0 >= x1"),
        (["--box", "0,0,500,30"], "outside the image"),
        (["--box", "1,2,3"], "x0,y0,x1,y1"),
        (["--point", "10,10:7"], "label"),
    ],
)
def test_bad_prompts_are_one_line_errors(
    prompted_run: Path, shapes_2d: Path, tmp_path: Path, capsys, monkeypatch, extra: list[str], message: str
) -> None:
    image = shapes_2d / "images" / "img_01.png"
    code, out = run_cli(["predict", str(prompted_run), str(image), "--out", str(tmp_path), *extra], capsys, monkeypatch)
    assert code == 1 and message in out, out
    assert "Traceback" not in out


def test_prompts_for_an_unprompted_model_are_refused(tiny_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image, _ = make_case(np.random.default_rng(0))
    nib.save(nib.Nifti1Image(image, tiny_affine()), tmp_path / "v.nii.gz")
    args = ["predict", str(tiny_run), str(tmp_path / "v.nii.gz"), "--box", "1,1,5,5,1,2", "--out", str(tmp_path)]
    code, out = run_cli(args, capsys, monkeypatch)
    assert code == 1 and "does not take prompts" in out


def test_pretrained_needs_a_model_with_a_loader(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path / "c.yaml", epochs=1)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    args = [
        "train",
        str(tiny_dataset),
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "r"),
        "--pretrained",
        str(weights),
    ]
    code, out = run_cli([*args, "--no-progress"], capsys, monkeypatch)
    assert code == 1 and "no loader for pretrained weights" in out


def test_evaluate_prompts_with_reference_boxes(prompted_run: Path, shapes_2d: Path, tmp_path: Path) -> None:
    from pipelines.predict import evaluate

    report = evaluate(prompted_run, shapes_2d, tmp_path / "report.json")
    assert set(report["per_label"]) == {"disc", "square"} and len(report["cases"]) == 6
    assert 0.0 <= report["mean_dice"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["mean_dice"] == report["mean_dice"]


def test_train_with_several_pretrained_files(shapes_2d: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import torch
    import yaml

    from medseg.models import create_model, tiny_overrides
    from tests.helpers import prompted_config

    resnet = create_model("sam_unet_r34", **tiny_overrides("sam_unet_r34")).resnet.state_dict()
    (tmp_path / "a.pth").write_bytes(b"")
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in resnet.items()}, tmp_path / "resnet.pth")
    cfg = prompted_config(tmp_path / "c.yaml", epochs=1, iters_per_epoch=1, max_val_slices=2)
    out = tmp_path / "run"
    args = ["train", str(shapes_2d), "--config", str(cfg), "--out", str(out), "--no-progress"]
    code, text = run_cli([*args, "--pretrained", str(tmp_path / "resnet.pth")], capsys, monkeypatch)
    assert code == 0, text
    saved = yaml.safe_load(RunDir(out).config.read_text())
    assert saved["model"]["pretrained"] == [str(tmp_path / "resnet.pth")]
    two = ["--pretrained", str(tmp_path / "resnet.pth"), "--pretrained", str(tmp_path / "a.pth")]
    code, text = run_cli([*args[:4], "--out", str(tmp_path / "r2"), "--no-progress", *two], capsys, monkeypatch)
    assert code == 1 and "a.pth" in text and "Traceback" not in text
