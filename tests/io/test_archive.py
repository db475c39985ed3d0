"""Zip input: a zipped DICOM series loads like its folder; unsafe or corrupt archives are refused."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import medseg.io.archive as archive_module
from medseg.core.errors import DataError
from medseg.io import ZipLimits, load_image, safe_extract_zip


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return archive


def test_zip_loads_like_the_folder(dicom_folder, tmp_path: Path) -> None:
    archive = zip_folder(dicom_folder.folder, tmp_path / "study.zip")
    from_folder = load_image(dicom_folder.folder)
    from_zip = load_image(archive)
    np.testing.assert_array_equal(from_zip.numpy(), from_folder.numpy())
    np.testing.assert_array_equal(from_zip.affine.numpy(), from_folder.affine.numpy())
    assert from_zip.meta["filename_or_obj"] == str(archive)
    assert from_zip.meta["series_uid"] == dicom_folder.big.uid
    small = load_image(archive, series_uid=dicom_folder.small.uid)
    assert small.shape[-1] == 2


def test_zip_errors_name_the_archive(dicom_folder, tmp_path: Path) -> None:
    archive = zip_folder(dicom_folder.folder, tmp_path / "study.zip")
    with pytest.raises(DataError, match=r"study\.zip") as info:
        load_image(archive, series_uid="9.9.9")
    assert "medseg-unzip" not in str(info.value)  # no temporary folder names in user-facing messages


def test_parent_reference_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.dcm", b"fine")
        zf.writestr("../evil.dcm", b"escape")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"\.\./evil\.dcm"):
        load_image(archive)
    with pytest.raises(DataError, match="'..'"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "evil.dcm").exists()
    assert list(dest.iterdir()) == []  # nothing left behind


def test_absolute_path_and_symlink_are_refused(tmp_path: Path) -> None:
    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/etc/evil.dcm", b"x")
    with pytest.raises(DataError, match="absolute path"):
        safe_extract_zip(absolute, tmp_path / "d1")

    link = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(link, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_zip(link, tmp_path / "d2")


def test_member_and_size_limits(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k in range(5):
            zf.writestr(f"f{k}.bin", bytes(1000))
    with pytest.raises(DataError, match="5 members.*at most 3"):
        load_image(archive, zip_limits=ZipLimits(max_members=3))
    with pytest.raises(DataError, match="at most 500 bytes per member"):
        safe_extract_zip(archive, tmp_path / "d", ZipLimits(max_member_bytes=500))
    with pytest.raises(DataError, match="at most 4000 bytes in total"):
        safe_extract_zip(archive, tmp_path / "d", ZipLimits(max_total_bytes=4000))
    out = safe_extract_zip(archive, tmp_path / "d")
    assert sorted(p.name for p in out.iterdir()) == [f"f{k}.bin" for k in range(5)]


def test_lying_sizes_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member whose central directory understates its size is refused, whichever check notices first."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", bytes(200_000))
    raw = bytearray(archive.read_bytes())
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 10)  # uncompressed size field of the central directory entry
    lying = tmp_path / "lying.zip"
    lying.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"lying\.zip"):
        safe_extract_zip(lying, tmp_path / "d", ZipLimits(max_member_bytes=1000))

    # The byte count while writing holds even if the declared sizes passed (as they would for a lying archive
    # read by a lenient decoder): switch off the declared-size check and extract the honest archive.
    monkeypatch.setattr(archive_module, "_check_declared", lambda *args: None)
    with pytest.raises(DataError, match="expands beyond the size limit"):
        safe_extract_zip(archive, tmp_path / "d", ZipLimits(max_member_bytes=1000))
    assert list((tmp_path / "d").iterdir()) == []


def test_corrupt_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 20)
    with pytest.raises(DataError, match=r"broken\.zip is not a readable zip"):
        load_image(archive)
    with pytest.raises(DataError, match="not found"):
        safe_extract_zip(tmp_path / "missing.zip", tmp_path / "d")
