"""Detached headers (``.mhd`` + ``.raw``): refused by default, read where the caller opts in for local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data import load_manifest
from medseg.data.verify import verify_dataset
from medseg.io import load_image
from medseg.transforms.io import LoadImage
from tests.helpers import run_cli
from tests.inference.test_contract import _run_dir


def _mhd(path: Path, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing((1.0, 1.5, 2.0))
    sitk.WriteImage(image, str(path), useCompression=False)
    assert path.with_suffix(".raw").is_file(), "SimpleITK wrote the pixels beside the header"
    return path


def test_library_readers_refuse_detached_data_unless_asked(tmp_path: Path) -> None:
    from medseg.core.errors import DataError

    path = _mhd(tmp_path / "ct.mhd", np.arange(16 * 16 * 8, dtype=np.float32).reshape(16, 16, 8))
    with pytest.raises(DataError, match="outside the file"):
        load_image(path)
    with pytest.raises(DataError, match="outside the file"):
        LoadImage()(path)
    image = LoadImage(allow_external_data=True)(path)
    assert tuple(image.shape) == (1, 16, 16, 8) and float(image[0, 1, 0, 0]) == 8 * 16


def test_a_dataset_of_detached_headers_verifies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for case in ("a", "b"):
        _mhd(tmp_path / "images" / f"{case}.mhd", rng.normal(size=(12, 12, 6)).astype(np.float32))
        _mhd(tmp_path / "labels" / f"{case}.mhd", (rng.random((12, 12, 6)) > 0.5).astype(np.uint8))
    problems = verify_dataset(load_manifest(tmp_path))
    assert problems == [], problems


def test_cli_predict_reads_detached_headers_only_with_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path / "run", "unet")
    image = _mhd(tmp_path / "scan.mhd", np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32))
    code, out = run_cli(
        ["predict", str(run), str(image), "--out", str(tmp_path / "out"), "--no-progress"], capsys, monkeypatch
    )
    assert code == 1 and "outside the file" in out and "Traceback" not in out
    args = ["predict", str(run), str(image), "--out", str(tmp_path / "out"), "--no-progress", "--allow-external-data"]
    code, out = run_cli(args, capsys, monkeypatch)
    assert code == 0, out
    mask = load_image(tmp_path / "out" / "scan_seg.nii.gz")
    assert tuple(mask.shape) == (1, 16, 16, 16)
