"""Malformed DICOM files, DICOM series (as zips and folders) and zip archives.

Everything is derived from pydicom's own ``CT_small.dcm`` (128 x 128, 16 bits), rewritten with header lies.
"""

from __future__ import annotations

import copy
import io
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from medseg.io import ZipLimits
from tests.corpus.base import Case, zeros_stream

_BASE = pydicom.dcmread(get_testdata_file("CT_small.dcm"))


@contextmanager
def _lenient() -> Iterator[None]:
    """Let pydicom set and write invalid values (the corpus writes them on purpose)."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.writing_validation_mode = saved


def ct(**changes: Any) -> pydicom.Dataset:
    """A copy of CT_small with header elements set (``None`` deletes an element)."""
    ds = copy.deepcopy(_BASE)
    with _lenient():
        for key, value in changes.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds


def dcm_bytes(ds: pydicom.Dataset) -> bytes:
    """The file's bytes, written without pydicom's value checks."""
    with _lenient():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        return buf.getvalue()


def series(n: int = 3, seed: int = 0, **per_slice: Callable[[int, pydicom.Dataset], None]) -> list[bytes]:
    """``n`` axial slices (2.5 mm apart) of one series; ``per_slice`` callbacks edit slice ``k``."""
    uid = generate_uid(entropy_srcs=[f"corpus-series-{seed}"])
    out = []
    for k in range(n):
        ds = ct(
            SeriesInstanceUID=uid,
            ImagePositionPatient=["-80", "-90", f"{30 + 2.5 * k:.2f}"],
            ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
            PixelSpacing=["0.8", "0.6"],
            SliceThickness="2.5",
            InstanceNumber=k + 1,
        )
        sop = generate_uid(entropy_srcs=[uid, str(k)])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        for edit in per_slice.values():
            edit(k, ds)
        out.append(dcm_bytes(ds))
    return out


def write_zip(path: Path, members: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def dicom_cases(root: Path) -> list[Case]:
    folder = root / "dicom"
    folder.mkdir(parents=True)
    cases: list[Case] = []

    def add(name: str, payload: bytes, **kw: Any) -> Path:
        path = folder / f"{name}.dcm"
        path.write_bytes(payload)
        cases.append(Case(f"dicom/{name}.dcm", path, **kw))
        return path

    good = dcm_bytes(ct())
    add("valid", good, valid=True)
    lies: dict[str, dict[str, Any]] = {
        "no-pixel-data": {"PixelData": None},
        "rows-lie": {"Rows": 256},
        "columns-lie": {"Columns": 64},
        "rows-zero": {"Rows": 0},
        "bits-allocated-lie": {"BitsAllocated": 32, "BitsStored": 32, "HighBit": 31},
        "bits-allocated-twelve": {"BitsAllocated": 12},
        "samples-three-for-grey": {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0},
        "samples-zero": {"SamplesPerPixel": 0},
        "pixel-spacing-nan": {"PixelSpacing": ["nan", "0.6"]},
        "pixel-spacing-zero": {"PixelSpacing": ["0", "0.6"]},
        "pixel-spacing-negative": {"PixelSpacing": ["-0.8", "0.6"]},
        "pixel-spacing-inf": {"PixelSpacing": ["inf", "0.6"]},
        "iop-not-orthonormal": {"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]},
        "iop-nan": {"ImageOrientationPatient": ["nan", "0", "0", "0", "1", "0"]},
        "iop-zero": {"ImageOrientationPatient": ["0", "0", "0", "0", "0", "0"]},
        "ipp-inf": {"ImagePositionPatient": ["inf", "0", "0"]},
        "ipp-short": {"ImagePositionPatient": ["1", "2"]},
        "frames-three": {"NumberOfFrames": "3"},
        "frames-zero": {"NumberOfFrames": "0"},
        "frames-negative": {"NumberOfFrames": "-2"},
        "rows-smaller-than-data": {"Rows": 100},
        "modality-sr-with-pixels": {"Modality": "SR"},
        "pixel-spacing-nan-no-geometry": {
            "PixelSpacing": ["nan", "nan"],
            "ImagePositionPatient": None,
            "ImageOrientationPatient": None,
        },
        "imager-spacing-zero": {
            "PixelSpacing": None,
            "ImagerPixelSpacing": ["0", "0"],
            "ImagePositionPatient": None,
            "ImageOrientationPatient": None,
        },
    }
    for name, changes in lies.items():
        add(name, dcm_bytes(ct(**changes)))
    add("rescale-overflows", dcm_bytes(ct(RescaleSlope="1e39")), header_refuses=False)
    add("truncated-pixels", good[: len(good) - 5000])
    add("truncated-header", good[:300])
    add("not-dicom", np.random.default_rng(0).bytes(4000))
    add("empty", b"")
    dicomdir = ct()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    add("dicomdir", dcm_bytes(dicomdir))
    jpip = ct(PixelDataProviderURL="http://127.0.0.1:1/jpip", PixelData=None)
    jpip.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.94"
    add("jpip-referenced", dcm_bytes(jpip))
    fake = ct()
    fake.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # claims JPEG baseline, holds raw bytes
    fake.PixelData = encapsulate([_BASE.PixelData])
    add("compressed-syntax-lie", dcm_bytes(fake), header_refuses=False)
    empty_fragment = ct()
    empty_fragment.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    empty_fragment.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    add("compressed-empty-jpeg", dcm_bytes(empty_fragment), header_refuses=False)
    return cases


def series_cases(root: Path) -> list[Case]:
    """DICOM series as zips (uploadable) and one as a folder."""
    folder = root / "series"
    folder.mkdir(parents=True)
    cases: list[Case] = []

    def add(name: str, slices: list[bytes], **kw: Any) -> Path:
        path = write_zip(folder / f"{name}.zip", [(f"s{k:03d}.dcm", data) for k, data in enumerate(slices)])
        cases.append(Case(f"series/{name}.zip", path, **kw))
        return path

    def set_on(index: int, **values: Any) -> Callable[[int, pydicom.Dataset], None]:
        def edit(k: int, ds: pydicom.Dataset) -> None:
            if k == index:
                with _lenient():
                    for key, value in values.items():
                        setattr(ds, key, value)

        return edit

    def eight_bit(k: int, ds: pydicom.Dataset) -> None:
        if k == 1:
            pixels = (ds.pixel_array.astype(np.int32) % 256).astype(np.uint8)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = pixels.tobytes()

    add("valid", series(), valid=True, volume=False)
    add("rows-lie-one-slice", series(e=set_on(1, Rows=64)))
    add("iop-differs", series(e=set_on(2, ImageOrientationPatient=["0", "1", "0", "0", "0", "1"])))
    add("duplicate-positions", series(e=set_on(2, ImagePositionPatient=["-80", "-90", "32.50"])))
    add("pixel-spacing-nan", series(e=set_on(0, PixelSpacing=["nan", "0.6"])))
    add("pixel-spacing-zero", series(e=set_on(1, PixelSpacing=["0", "0"])))
    add("ipp-nan", series(e=set_on(1, ImagePositionPatient=["nan", "-90", "32.5"])))
    add("gaps-irregular", series(n=4, e=set_on(3, ImagePositionPatient=["-80", "-90", "45"])))
    add("bits-differ", series(e=eight_bit))
    add("multi-frame-member", series(e=set_on(0, NumberOfFrames="2")))
    add("bits-allocated-lie", series(e=set_on(1, BitsAllocated=8, BitsStored=8, HighBit=7)))

    def strip_pixels(k: int, ds: pydicom.Dataset) -> None:
        del ds.PixelData

    add("no-pixel-data", series(e=strip_pixels))
    good = series()
    truncated = [good[0], good[1][: len(good[1]) - 3000], good[2]]
    add("member-truncated", truncated)
    as_folder = folder / "rows-lie-folder"
    as_folder.mkdir()
    for k, data in enumerate(series(e=set_on(0, Columns=300))):
        (as_folder / f"s{k}.dcm").write_bytes(data)
    cases.append(Case("series/rows-lie-folder", as_folder, upload=False))
    return cases


def zip_cases(root: Path) -> list[Case]:
    folder = root / "zip"
    folder.mkdir(parents=True)
    cases: list[Case] = []
    slices = series(seed=5)

    def add(name: str, path: Path, **kw: Any) -> None:
        cases.append(Case(f"zip/{name}.zip", path, **kw))

    def members(name: str, items: list[tuple[str, bytes]], **kw: Any) -> None:
        add(name, write_zip(folder / f"{name}.zip", items), **kw)

    members("zip-slip-parent", [("../../evil.dcm", slices[0]), *[(f"s{k}.dcm", d) for k, d in enumerate(slices)]])
    members("zip-slip-absolute", [("/tmp/evil.dcm", slices[0])])
    members("zip-slip-backslash", [("..\\..\\evil.dcm", slices[0])])
    members("zip-slip-drive", [("C:/evil.dcm", slices[0])])
    members("empty", [])
    members("non-dicom-members", [("readme.txt", b"hello\n"), ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(100))])
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for k, data in enumerate(slices):
            zf.writestr(f"s{k}.dcm", data)
    members("nested-zip", [("inner.zip", inner.getvalue())])
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(folder / "symlink-member.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
        zf.writestr("s0.dcm", slices[0])
    add("symlink-member", folder / "symlink-member.zip")
    bomb = folder / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("s0.dcm", slices[0])
        with zf.open("zeros.dcm", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(64):
                member.write(chunk)
    add("bomb", bomb, options={"zip_limits": ZipLimits(max_total_bytes=16 << 20)})
    add("declared-size-lie", _declared_size_lie(folder / "size-lie.zip"))
    many = [(f"m{k:04d}.txt", b"") for k in range(600)]
    members("too-many-members", many, options={"zip_limits": ZipLimits(max_members=500)})
    raw = write_zip(folder / "truncated-src.zip", [(f"s{k}.dcm", d) for k, d in enumerate(slices)])
    data = raw.read_bytes()
    (folder / "truncated.zip").write_bytes(data[: len(data) // 2])
    add("truncated", folder / "truncated.zip")
    raw.unlink()
    (folder / "not-a-zip.zip").write_bytes(np.random.default_rng(1).bytes(3000))
    add("not-a-zip", folder / "not-a-zip.zip")
    encrypted = bytearray(write_zip(folder / "encrypted.zip", [("s0.dcm", slices[0])]).read_bytes())
    _set_encrypted_flag(encrypted)
    (folder / "encrypted.zip").write_bytes(bytes(encrypted))
    add("encrypted-flag", folder / "encrypted.zip")
    return cases


def _declared_size_lie(path: Path) -> Path:
    """A zip whose member declares 100 bytes but whose deflate stream holds 4 MiB of zeros (a lying bomb)."""
    body = zeros_stream(4 << 20, -15)
    name = b"s0.dcm"
    crc = 0
    local = b"PK\x03\x04" + (20).to_bytes(2, "little") + (0).to_bytes(2, "little") + (8).to_bytes(2, "little")
    local += bytes(4) + crc.to_bytes(4, "little") + len(body).to_bytes(4, "little") + (100).to_bytes(4, "little")
    local += len(name).to_bytes(2, "little") + bytes(2) + name
    central = b"PK\x01\x02" + (20).to_bytes(2, "little") * 2 + (0).to_bytes(2, "little") + (8).to_bytes(2, "little")
    central += bytes(4) + crc.to_bytes(4, "little") + len(body).to_bytes(4, "little") + (100).to_bytes(4, "little")
    central += len(name).to_bytes(2, "little") + bytes(2) * 4 + bytes(4) + (0).to_bytes(4, "little") + name
    offset = len(local) + len(body)
    end = b"PK\x05\x06" + bytes(4) + (1).to_bytes(2, "little") * 2 + len(central).to_bytes(4, "little")
    end += offset.to_bytes(4, "little") + bytes(2)
    path.write_bytes(local + body + central + end)
    return path


def _set_encrypted_flag(data: bytearray) -> None:
    """Set the 'encrypted' general-purpose bit in every local and central header of a zip held in ``data``."""
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (found := data.find(signature, start)) >= 0:
            data[found + flag_at] |= 0x01
            start = found + 4


BUILDERS: tuple[Callable[[Path], list[Case]], ...] = (dicom_cases, series_cases, zip_cases)
