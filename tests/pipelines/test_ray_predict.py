"""Batch prediction on a local Ray instance (started by the test, 2 CPUs): same files as a single-process run, a
broken case reported without stopping the batch."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import run_cli
from tests.inference.test_contract import _run_dir
from tests.pipelines.test_sharding import _images

pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install 'medseg[ray]'")
pytestmark = pytest.mark.integration


def test_ray_batch_equals_the_single_process_run_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path / "run", "unet")
    _images(tmp_path / "in", 4)
    code, out = run_cli(
        ["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "single")], capsys, monkeypatch
    )
    assert code == 0, out
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti")
    args = ["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2"]
    code, out = run_cli([*args, "--no-progress"], capsys, monkeypatch)
    assert code == 1 and "4 written, 0 skipped, 1 failed" in out and "broken.nii.gz" in out, out
    report = json.loads((tmp_path / "ray" / "batch_report.json").read_text())
    assert len(report["written"]) == 4 and list(report["failed"]) == [str(tmp_path / "in" / "broken.nii.gz")]
    assert report["failed"][str(tmp_path / "in" / "broken.nii.gz")].startswith("DataError: ")
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert single == sorted(p.name for p in (tmp_path / "ray").iterdir() if p.name != "batch_report.json")
    for name in single:
        a, b = tmp_path / "single" / name, tmp_path / "ray" / name
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
        else:
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
            np.testing.assert_array_equal(nib.load(a).affine, nib.load(b).affine)
