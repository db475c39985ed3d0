"""``medseg predict`` on files whose header lies: one line ``error: ...`` and exit status 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus.base import volume
from tests.corpus.volumes import meta_text, nifti_bytes, nrrd_text
from tests.helpers import run_cli

BAD_FILES = {
    "dev-zero.nrrd": (nrrd_text(data_file="/dev/zero")[:-1], "outside the file"),
    "truncated.nii": (nifti_bytes()[:900], "expected 1344 bytes"),
    "spacing-nan.mha": (meta_text(ElementSpacing="1 nan 1") + volume().tobytes(), "not finite and positive"),
    "nan-voxels.nii": (nifti_bytes(volume() * float("nan")), "non-finite voxel values"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_predict_refuses_a_lying_file_in_one_line(
    name: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, words = BAD_FILES[name]
    image = tmp_path / name
    image.write_bytes(payload)
    code, out = run_cli(["predict", str(tiny_run), str(image), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 1, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0] and words in lines[0], out
    assert "Traceback" not in out
