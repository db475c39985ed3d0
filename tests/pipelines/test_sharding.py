"""Batch prediction split into parts (``--num-parts/--part-id``) and resumed (``--skip-existing``)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.core.errors import ConfigError, DataError
from pipelines.batch import case_name, list_cases, shard
from tests.helpers import run_cli, tiny_affine
from tests.inference.test_contract import _run_dir


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"case_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16)).astype(np.float32), tiny_affine()), path)
        paths.append(path)
    return paths


def test_parts_are_disjoint_cover_the_batch_and_follow_nnunet(tmp_path: Path) -> None:
    cases = [tmp_path / f"{n}.nii.gz" for n in "edcba"]
    parts = [shard(sorted(cases, key=case_name), 3, k) for k in range(3)]
    assert [[case_name(p) for p in part] for part in parts] == [["a", "d"], ["b", "e"], ["c"]]
    with pytest.raises(ConfigError, match="0 <= part-id < 3"):
        shard(cases, 3, 3)
    with pytest.raises(ConfigError, match="num-parts 0"):
        shard(cases, 0, 0)


def test_a_folder_of_images_lists_its_cases(tmp_path: Path) -> None:
    images = _images(tmp_path / "in", 3)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "series_x").mkdir()  # a DICOM series folder among the files is one case
    assert list_cases([tmp_path / "in"]) == [*images, tmp_path / "in" / "series_x"]
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"")
    assert list_cases([dicom]) == [dicom], "a folder of DICOM files is one series, not a folder of cases"
    with pytest.raises(DataError, match="case_00"):
        list_cases([tmp_path / "in", images[0]])


def test_sharded_run_equals_the_single_run_file_for_file_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path / "run", "unet")
    _images(tmp_path / "in", 5)
    base = ["predict", str(run), str(tmp_path / "in"), "--no-progress"]
    code, out = run_cli([*base, "--out", str(tmp_path / "single")], capsys, monkeypatch)
    assert code == 0, out
    for k in (0, 1):
        code, out = run_cli(
            [*base, "--out", str(tmp_path / "parts"), "--num-parts", "2", "--part-id", str(k)], capsys, monkeypatch
        )
        assert code == 0, out
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(single) == 10 and single == sorted(p.name for p in (tmp_path / "parts").iterdir())
    for name in single:
        a, b = tmp_path / "single" / name, tmp_path / "parts" / name
        if name.endswith(".json"):
            assert a.read_text() == b.read_text(), name
        else:
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
            np.testing.assert_array_equal(nib.load(a).affine, nib.load(b).affine)

    # an interrupted part: one case lost its statistics (written last), so only that case is predicted again
    (tmp_path / "parts" / "case_03_seg.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "parts").iterdir()}
    code, out = run_cli([*base, "--out", str(tmp_path / "parts"), "--skip-existing"], capsys, monkeypatch)
    assert code == 0, out
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "parts").iterdir()}
    changed = sorted(n for n in after if before.get(n) != after[n])
    assert changed == ["case_03_seg.json", "case_03_seg.nii.gz"], changed
    code, out = run_cli(
        [*base, "--out", str(tmp_path / "parts"), "--part-id", "2", "--num-parts", "2"], capsys, monkeypatch
    )
    assert code == 1 and "0 <= part-id < 2" in out
