"""The ``medseg`` command line on tiny data, and every bad input it must answer with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medseg.inference.rundir import RunDir, load_checkpoint
from tests.helpers import run_cli, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def run_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp / "tiny.yaml", epochs=1)
    proc = run_process("train", str(tiny_dataset), "--config", str(cfg), "--out", str(tmp / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "run directory" in proc.stdout
    return tmp / "run"


def test_models_lists_cards(capsys, monkeypatch) -> None:
    code, out = run_cli(["models", "--json"], capsys, monkeypatch)
    assert code == 0
    names = {c["name"] for c in json.loads(out)}
    assert {"segformer3d", "unet"} <= names


def test_predict_and_evaluate(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image = tiny_dataset / "imagesTr" / "case_00.nii.gz"
    code, out = run_cli(["predict", str(trained_run), str(image), "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 0, out
    mask = nib.load(tmp_path / "case_00_seg.nii.gz")
    ref = nib.load(image)
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-5)
    stats = json.loads((tmp_path / "case_00_seg.json").read_text())
    assert stats["label_names"] == ["background", "sphere", "box"]
    code, out = run_cli(["evaluate", str(trained_run), str(tiny_dataset)], capsys, monkeypatch)
    assert code == 0, out
    report = json.loads((trained_run / "evaluation" / f"{tiny_dataset.name}.json").read_text())
    assert set(report["per_label"]) == {"sphere", "box"} and len(report["cases"]) == 4
    assert {"dice", "hd95", "accuracy", "precision", "specificity", "iou", "mcc"} == set(report["per_label"]["sphere"])


def test_verify_data_clean_and_broken(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    code, out = run_cli(["verify-data", str(tiny_dataset)], capsys, monkeypatch)
    assert code == 0 and "no problems" in out
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), broken / "labelsTr" / "case_01.nii.gz")
    (broken / "labelsTr" / "case_02.nii.gz").unlink()
    code, out = run_cli(["verify-data", str(broken)], capsys, monkeypatch)
    assert code == 1
    assert "case_01" in out and "case_02" in out and "3 problem(s)" in out  # case_01: shape + affine; case_02: missing


def _one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in out
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert error_lines, out
    for needle in needles:
        assert needle in out, (needle, out)


def test_unknown_model_suggests(tiny_dataset: Path, capsys, monkeypatch) -> None:
    code, out = run_cli(["train", str(tiny_dataset), "--model", "segformer"], capsys, monkeypatch)
    _one_line_error(code, out, "did you mean", "segformer3d")


def test_empty_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    code, out = run_cli(["train", str(tmp_path / "empty"), "--model", "segformer3d"], capsys, monkeypatch)
    _one_line_error(code, out, "empty")


def test_shape_mismatch_stops_training(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_dataset, broken)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), broken / "labelsTr" / "case_03.nii.gz")
    cfg = tiny_config(tmp_path / "c.yaml")
    code, out = run_cli(["train", str(broken), "--config", str(cfg), "--out", str(tmp_path / "r")], capsys, monkeypatch)
    _one_line_error(code, out, "case_03", "verify-data")


def test_wrong_channels_and_corrupt_file(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    two = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32, 2), np.float32), np.eye(4)), two)
    code, out = run_cli(["predict", str(trained_run), str(two), "--out", str(tmp_path)], capsys, monkeypatch)
    _one_line_error(code, out, "two_channels.nii.gz", "2 channel")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    code, out = run_cli(["predict", str(trained_run), str(corrupt), "--out", str(tmp_path)], capsys, monkeypatch)
    _one_line_error(code, out, "corrupt.nii.gz")


def _dicom_series(folder: Path, spacing: str) -> Path:
    folder.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = pydicom.uid.generate_uid()
    for k in range(4):
        ds = template.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_dicom_with_nan_spacing_is_refused(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    series = _dicom_series(tmp_path / "nan_series", "nan")
    code, out = run_cli(["predict", str(trained_run), str(series), "--out", str(tmp_path)], capsys, monkeypatch)
    _one_line_error(code, out, "nan_series", "PixelSpacing")


def test_bad_config_key(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochz: 2\n")
    code, out = run_cli(["train", str(tiny_dataset), "--config", str(cfg)], capsys, monkeypatch)
    _one_line_error(code, out, "train.epochz")


def test_real_process_exit_codes_and_debug(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_process("verify-data", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "error:" in proc.stderr
    proc = run_process("--debug", "verify-data", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_killed_training_resumes_with_the_same_step_count(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "long.yaml", epochs=40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(tiny_dataset), "--config", str(cfg), "--out", str(run)]
    proc = subprocess.Popen([*cmd, "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = RunDir(run).last
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    killed_at = load_checkpoint(last)
    assert killed_at["epoch"] < 40
    done = run_process(
        "train",
        str(tiny_dataset),
        "--config",
        str(cfg),
        "--out",
        str(run),
        "--resume",
        "--epochs",
        str(killed_at["epoch"] + 1),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    after = load_checkpoint(last)
    assert after["epoch"] == killed_at["epoch"] + 1 and after["step"] == killed_at["step"] + 3
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == list(range(1, after["epoch"] + 1))


def test_demo_end_to_end_on_one_epoch(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "demo"
    code, text = run_cli(["demo", "--out", str(out), "--epochs", "1", "--no-progress"], capsys, monkeypatch)
    assert code == 0, text
    assert "held-out Dice: gray matter" in text and str(out) in text
    for name in ("config.yaml", "card.json", "checkpoints/best.pt", "metrics.jsonl", "curves.png", "log.txt"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    report = json.loads((out / "evaluation" / "heldout.json").read_text())
    assert set(report["per_label"]) == {"gray_matter", "white_matter"}
    assert report["mean_dice"] > 0.5  # one epoch already separates the tissues; the full demo reaches > 0.8
    for image in sorted((out / "data" / "brain_heldout" / "images").glob("*.nii.gz")):
        mask = nib.load(out / "predictions" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        ref = nib.load(image)
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-6)
        assert ref.affine[0, 0] < 0, "held-out subjects are stored flipped, so this checks the mapping back"
    code, text = run_cli(["demo", "--out", str(out), "--epochs", "1"], capsys, monkeypatch)
    _one_line_error(code, text, "--force")
