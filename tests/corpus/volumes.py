"""Malformed NIfTI, NRRD and MetaImage files: header lies, detached data tricks, geometry and size lies."""

from __future__ import annotations

import bz2
import gzip
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.corpus.base import SHAPE, Case, oblique_affine, volume, zeros_stream

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------------- NIfTI


def nifti_bytes(data: np.ndarray | None = None, **fields: object) -> bytes:
    """A single-file NIfTI-1 (header, 4 extension bytes, data) whose header fields are overridden by ``fields``."""
    data = volume() if data is None else data
    img = nib.Nifti1Image(data, oblique_affine())
    img.set_qform(oblique_affine(), code=1)
    hdr = img.header
    hdr["vox_offset"] = 352
    for key, value in fields.items():
        if key == "dim_at":
            index, size = value  # type: ignore[misc]
            hdr.structarr["dim"][index] = size
        elif key == "pixdim_at":
            index, size = value  # type: ignore[misc]
            hdr.structarr["pixdim"][index] = size
        else:
            hdr.structarr[key] = value
    return hdr.binaryblock + b"\x00" * 4 + np.asarray(data).tobytes(order="F")


def nifti_cases(root: Path) -> list[Case]:
    folder = root / "nifti"
    folder.mkdir(parents=True)
    cases: list[Case] = []

    def add(name: str, payload: bytes, *, suffix: str = ".nii", **kw: object) -> Path:
        path = folder / f"{name}{suffix}"
        path.write_bytes(gzip.compress(payload, 1) if suffix == ".nii.gz" and not kw.pop("raw", False) else payload)
        cases.append(Case(f"nifti/{name}{suffix}", path, **kw))  # type: ignore[arg-type]
        return path

    good = nifti_bytes()
    add("valid", good, valid=True, volume=True)
    add("valid", good, suffix=".nii.gz", valid=True, volume=True)
    head_fields: dict[str, dict[str, object]] = {
        "dim0-zero": {"dim_at": (0, 0)},
        "dim0-eight": {"dim_at": (0, 8)},
        "dim0-negative": {"dim_at": (0, -1)},
        "dim-zero": {"dim_at": (2, 0)},
        "dim-negative": {"dim_at": (1, -5)},
        "dims-huge": {"dim": [3, 30000, 30000, 30000, 1, 1, 1, 1]},
        "dims-more-than-data": {"dim_at": (3, 7)},
        "dims-fewer-than-data": {"dim_at": (3, 5)},
        "dims-six-d": {"dim": [6, 8, 7, 6, 1, 1, 1, 1]},
        "dims-5d-not-vector": {"dim": [5, 8, 7, 3, 2, 1, 1, 1]},
        "dims-1d": {"dim": [1, 336, 1, 1, 1, 1, 1, 1]},
        "pixdim-nan": {"pixdim_at": (2, NAN)},
        "pixdim-zero": {"pixdim_at": (1, 0.0)},
        "pixdim-negative": {"pixdim_at": (3, -2.0)},
        "pixdim-inf": {"pixdim_at": (1, INF)},
        "qform-nan": {"quatern_b": NAN},
        "qform-offset-nan": {"qoffset_y": NAN},
        "qform-not-rotation": {"quatern_b": 0.9, "quatern_c": 0.9, "quatern_d": 0.9},
        "sform-nan": {"sform_code": 1, "srow_x": [NAN, 0, 0, 0]},
        "sform-singular": {"sform_code": 1, "srow_x": [0, 0, 0, 1], "srow_y": [0, 1, 0, 0], "srow_z": [0, 0, 1, 0]},
        "sform-offset-inf": {"sform_code": 1, "srow_z": [0, 0, 1, INF]},
        "sform-rows-repeated": {
            "sform_code": 1,
            "srow_x": [1, 0, 0, 0],
            "srow_y": [1, 0, 0, 0],
            "srow_z": [0, 0, 1, 0],
        },
        "vox-offset-past-eof": {"vox_offset": 1e6},
        "vox-offset-nan": {"vox_offset": NAN},
        "vox-offset-in-header": {"vox_offset": 100},
        "vox-offset-fraction": {"vox_offset": 352.5},
        "datatype-unknown": {"datatype": 9999},
        "datatype-complex": {"datatype": 32, "bitpix": 64},
        "datatype-rgb": {"datatype": 128, "bitpix": 24},
        "bitpix-lie": {"bitpix": 8},
        "magic-wrong": {"magic": b"xyz"},
        "magic-analyze": {"magic": b""},
        "magic-pair-in-nii": {"magic": b"ni1"},
        "sizeof-hdr-wrong": {"sizeof_hdr": 123},
    }
    for name, fields in head_fields.items():
        add(name, nifti_bytes(**fields))
    add("dims-more-than-data", nifti_bytes(dim_at=(3, 7)), suffix=".nii.gz", header_refuses=False)
    add("truncated-data", good[: 352 + (len(good) - 352) // 2])
    add("header-only", good[:352])
    add("truncated-header", good[:200])
    add("empty", b"")
    add("trailing-bytes", good + b"\x00" * 64)
    bad = volume()
    bad[1, 2, 3] = NAN
    add("voxels-nan", nifti_bytes(bad), header_refuses=False)
    bad = volume()
    bad[0, 0, 0] = INF
    add("voxels-inf", nifti_bytes(bad), suffix=".nii.gz", header_refuses=False)
    add("scl-slope-inf", nifti_bytes(scl_slope=INF))
    add("float64-overflows-float32", nifti_bytes(volume().astype(np.float64) * 1e300), header_refuses=False)
    gz = gzip.compress(good, 1)
    add("gzip-truncated", gz[: len(gz) // 2], suffix=".nii.gz", raw=True, header_refuses=False)
    corrupt = bytearray(gz)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 16] = b"\xff" * 16
    add("gzip-corrupt", bytes(corrupt), suffix=".nii.gz", raw=True, header_refuses=False)
    add("gzip-longer-than-claim", good + bytes(4096), suffix=".nii.gz", header_refuses=False)
    add("gzip-not-gzip", good, suffix=".nii.gz", raw=True)
    bomb = nifti_bytes()[:352] + b"\x00" * 4
    add(
        "gzip-bomb",
        gzip.compress(bomb, 1) + zeros_stream(64 << 20, 31),
        suffix=".nii.gz",
        raw=True,
        header_refuses=False,
    )
    # NIfTI pairs: the pixels sit in a second file.
    pair_head = nifti_bytes(magic=b"ni1", vox_offset=0)
    data = volume().tobytes(order="F")
    for name, img_bytes in (("pair", data), ("pair-img-truncated", data[:100])):
        hdr = folder / f"{name}.hdr"
        hdr.write_bytes(pair_head[:348])
        (folder / f"{name}.img").write_bytes(img_bytes)
        cases.append(Case(f"nifti/{name}.hdr", hdr))  # refused without the opt-in
        opt = {"allow_external_data": True}
        cases.append(Case(f"nifti/{name}.hdr+opt-in", hdr, valid=name == "pair", options=opt, upload=False))
    lonely = folder / "pair-img-missing.hdr"
    lonely.write_bytes(pair_head[:348])
    cases.append(Case("nifti/pair-img-missing.hdr+opt-in", lonely, options={"allow_external_data": True}, upload=False))
    single_magic = folder / "pair-magic-single.hdr"
    single_magic.write_bytes(nifti_bytes()[:348])
    (folder / "pair-magic-single.img").write_bytes(data)
    cases.append(Case("nifti/pair-magic-single.hdr+opt-in", single_magic, options={"allow_external_data": True}))
    return cases


# --------------------------------------------------------------------------------------------------- NRRD

NRRD_FIELDS = {
    "type": "float",
    "dimension": "3",
    "space": "left-posterior-superior",
    "sizes": " ".join(str(s) for s in SHAPE),
    "space directions": "(0.9,0,0) (0,1.1,0) (0,0,2)",
    "kinds": "domain domain domain",
    "endian": "little",
    "encoding": "raw",
    "space origin": "(1,2,3)",
}


def nrrd_text(**changes: str | None) -> bytes:
    """A NRRD header (with its blank line) from :data:`NRRD_FIELDS`, fields changed or (None) removed."""
    fields = {**NRRD_FIELDS, **changes}
    lines = ["NRRD0004"] + [f"{k.replace('_', ' ')}: {v}" for k, v in fields.items() if v is not None]
    return ("\n".join(lines) + "\n\n").encode()


def nrrd_cases(root: Path) -> list[Case]:
    folder = root / "nrrd"
    folder.mkdir(parents=True)
    outside = root / "outside.raw"
    outside.write_bytes(volume().tobytes())
    cases: list[Case] = []
    raw = volume().transpose(2, 1, 0).tobytes()

    def add(name: str, payload: bytes, suffix: str = ".nrrd", **kw: object) -> Path:
        path = folder / f"{name}{suffix}"
        path.write_bytes(payload)
        cases.append(Case(f"nrrd/{name}{suffix}", path, **kw))  # type: ignore[arg-type]
        return path

    add("valid", nrrd_text() + raw, valid=True, volume=True)
    add("valid-gzip", nrrd_text(encoding="gzip") + gzip.compress(raw), valid=True, volume=True)
    (folder / "detached.raw").write_bytes(raw)
    detached = nrrd_text(data_file="detached.raw")[:-1]
    add("detached", detached, suffix=".nhdr")
    add("detached-opt-in", detached, suffix=".nhdr", valid=True, options={"allow_external_data": True}, upload=False)
    add("detached-in-nrrd", detached)
    add("datafile-spelling", nrrd_text(datafile="detached.raw")[:-1])
    for name, target in (
        ("data-file-dev-zero", "/dev/zero"),
        ("data-file-etc-passwd", "/etc/passwd"),
        ("data-file-parent", "../outside.raw"),
        ("data-file-absolute", str(outside)),
        ("data-file-pattern", "slice%03d.raw 0 5 1"),
        ("data-file-missing", "nothing-here.raw"),
    ):
        add(name, nrrd_text(data_file=target)[:-1])
        add(f"{name}-opt-in", nrrd_text(data_file=target)[:-1], suffix=".nhdr", options={"allow_external_data": True})
    add("data-file-list", nrrd_text(data_file="LIST")[:-1] + b"detached.raw\ndetached.raw\n")
    add(
        "data-file-list-opt-in",
        nrrd_text(data_file="LIST")[:-1] + b"detached.raw\n",
        suffix=".nhdr",
        options={"allow_external_data": True},
    )
    os.symlink(outside, folder / "link.raw")
    add(
        "data-file-symlink-out-opt-in",
        nrrd_text(data_file="link.raw")[:-1],
        suffix=".nhdr",
        options={"allow_external_data": True},
    )
    header_lies = {
        "sizes-larger": {"sizes": "8 7 60"},
        "sizes-smaller": {"sizes": "8 7 5"},
        "sizes-huge": {"sizes": "100000 100000 100000"},
        "sizes-zero": {"sizes": "8 0 6"},
        "sizes-negative": {"sizes": "8 -7 6"},
        "sizes-fraction": {"sizes": "8 7.5 6"},
        "sizes-count": {"sizes": "8 7"},
        "dimension-zero": {"dimension": "0"},
        "dimension-huge": {"dimension": "99"},
        "dimension-four": {"dimension": "4", "sizes": "8 7 3 2", "space directions": None, "kinds": None},
        "type-unknown": {"type": "quaternion"},
        "type-block": {"type": "block"},
        "encoding-unknown": {"encoding": "zrl2"},
        "encoding-missing": {"encoding": None},
        "endian-missing": {"endian": None},
        "directions-nan": {"space directions": "(nan,0,0) (0,1.1,0) (0,0,2)"},
        "directions-zero": {"space directions": "(0,0,0) (0,1.1,0) (0,0,2)"},
        "directions-singular": {"space directions": "(1,0,0) (1,0,0) (0,0,2)"},
        "directions-inf": {"space directions": "(inf,0,0) (0,1,0) (0,0,1)"},
        "directions-count": {"space directions": "(1,0,0) (0,1,0)"},
        "directions-not-square": {"space directions": "(1,0) (0,1) (1,1)"},
        "origin-nan": {"space origin": "(nan,2,3)"},
        "origin-inf": {"space origin": "(1,-inf,3)"},
        "spacings-nan": {"space directions": None, "space": None, "space origin": None, "spacings": "1 nan 1"},
        "spacings-zero": {"space directions": None, "space": None, "space origin": None, "spacings": "1 0 1"},
        "spacings-negative": {"space directions": None, "space": None, "space origin": None, "spacings": "-1 1 1"},
        "two-component-axes": {"space directions": "none none (0,0,2)"},
        "byte-skip-past-data": {"byte skip": "100000"},
        "byte-skip-negative-gzip": {"byte skip": "-1", "encoding": "gzip"},
        "line-skip-negative": {"line skip": "-3"},
    }
    for name, changes in header_lies.items():
        add(name, nrrd_text(**changes) + raw)
    add("no-magic", nrrd_text()[9:] + raw)
    add("no-blank-line", nrrd_text()[:-1])
    add("empty", b"")
    add("truncated-raw", nrrd_text() + raw[: len(raw) // 2])
    add("trailing-bytes", nrrd_text() + raw + b"\x00" * 16)
    add("header-junk-1mib", b"NRRD0004\n" + b"# padding\n" * 110_000)
    gz = gzip.compress(raw)
    add("gzip-truncated", nrrd_text(encoding="gzip") + gz[: len(gz) // 2])
    add("gzip-corrupt", nrrd_text(encoding="gzip") + gz[:12] + b"\xff" * 40 + gz[52:])
    add("gzip-sizes-larger", nrrd_text(encoding="gzip", sizes="8 7 9") + gz)
    add("gzip-bomb", nrrd_text(encoding="gzip") + zeros_stream(64 << 20, 31))
    add("gzip-not-gzip", nrrd_text(encoding="gzip") + raw)
    bz = bz2.compress(raw)
    add("bzip2-truncated", nrrd_text(encoding="bzip2") + bz[: len(bz) // 2])
    values = " ".join(f"{v:.4f}" for v in volume().transpose(2, 1, 0).ravel())
    add("ascii-too-few", nrrd_text(encoding="ascii") + values.rsplit(" ", 40)[0].encode())
    add("hex-odd", nrrd_text(encoding="hex") + raw.hex().encode()[:-1])
    nan = volume()
    nan[3, 3, 3] = NAN
    add("voxels-nan", nrrd_text() + nan.transpose(2, 1, 0).tobytes(), header_refuses=False)
    return cases


# --------------------------------------------------------------------------------------------------- MetaImage

META_FIELDS = {
    "ObjectType": "Image",
    "NDims": "3",
    "BinaryData": "True",
    "BinaryDataByteOrderMSB": "False",
    "CompressedData": "False",
    "TransformMatrix": "1 0 0 0 1 0 0 0 1",
    "Offset": "1 2 3",
    "ElementSpacing": "0.9 1.1 2",
    "DimSize": " ".join(str(s) for s in SHAPE),
    "ElementType": "MET_FLOAT",
    "ElementDataFile": "LOCAL",
}


def meta_text(**changes: str | None) -> bytes:
    """A MetaImage header from :data:`META_FIELDS` (``ElementDataFile`` last), fields changed or (None) removed."""
    fields = {**META_FIELDS, **changes}
    last = fields.pop("ElementDataFile")
    lines = [f"{k} = {v}" for k, v in fields.items() if v is not None]
    if last is not None:
        lines.append(f"ElementDataFile = {last}")
    return ("\n".join(lines) + "\n").encode()


def metaimage_cases(root: Path) -> list[Case]:
    import zlib

    folder = root / "metaimage"
    folder.mkdir(parents=True)
    if not (root / "outside.raw").exists():
        (root / "outside.raw").write_bytes(volume().tobytes())
    raw = volume().transpose(2, 1, 0).tobytes()
    cases: list[Case] = []

    def add(name: str, payload: bytes, suffix: str = ".mha", **kw: object) -> Path:
        path = folder / f"{name}{suffix}"
        path.write_bytes(payload)
        cases.append(Case(f"metaimage/{name}{suffix}", path, **kw))  # type: ignore[arg-type]
        return path

    z = zlib.compress(raw)
    add("valid", meta_text() + raw, valid=True, volume=True)
    compressed = meta_text(CompressedData="True", CompressedDataSize=str(len(z)))
    add("valid-compressed", compressed + z, valid=True, volume=True)
    (folder / "detached.raw").write_bytes(raw)
    add("detached", meta_text(ElementDataFile="detached.raw"), suffix=".mhd")
    add(
        "detached-opt-in",
        meta_text(ElementDataFile="detached.raw"),
        suffix=".mhd",
        valid=True,
        options={"allow_external_data": True},
        upload=False,
    )
    for name, target in (
        ("data-file-dev-zero", "/dev/zero"),
        ("data-file-etc-passwd", "/etc/passwd"),
        ("data-file-parent", "../outside.raw"),
        ("data-file-list", "LIST"),
        ("data-file-pattern", "slice%03d.raw 1 6 1"),
    ):
        add(name, meta_text(ElementDataFile=target))
        add(f"{name}-opt-in", meta_text(ElementDataFile=target), suffix=".mhd", options={"allow_external_data": True})
    add("data-file-next-to-it", meta_text(ElementDataFile="detached.raw"))
    (folder / "detached-short.raw").write_bytes(raw[:50])
    add(
        "detached-short-opt-in",
        meta_text(ElementDataFile="detached-short.raw"),
        suffix=".mhd",
        options={"allow_external_data": True},
    )
    header_lies = {
        "dimsize-larger": {"DimSize": "8 7 60"},
        "dimsize-smaller": {"DimSize": "8 7 5"},
        "dimsize-huge": {"DimSize": "100000 100000 100000"},
        "dimsize-zero": {"DimSize": "8 0 6"},
        "dimsize-negative": {"DimSize": "-8 7 6"},
        "dimsize-count": {"DimSize": "8 7"},
        "ndims-four": {"NDims": "4"},
        "ndims-zero": {"NDims": "0"},
        "ndims-text": {"NDims": "three"},
        "elementtype-unknown": {"ElementType": "MET_QUATERNION"},
        "elementtype-missing": {"ElementType": None},
        "spacing-nan": {"ElementSpacing": "0.9 nan 2"},
        "spacing-zero": {"ElementSpacing": "0 1.1 2"},
        "spacing-negative": {"ElementSpacing": "0.9 1.1 -2"},
        "spacing-inf": {"ElementSpacing": "inf 1 1"},
        "offset-inf": {"Offset": "1 inf 3"},
        "offset-nan": {"Offset": "nan 2 3"},
        "matrix-nan": {"TransformMatrix": "1 0 0 0 nan 0 0 0 1"},
        "matrix-zero": {"TransformMatrix": "0 0 0 0 0 0 0 0 0"},
        "matrix-singular": {"TransformMatrix": "1 0 0 1 0 0 0 0 1"},
        "matrix-count": {"TransformMatrix": "1 0 0 1"},
        "channels-zero": {"ElementNumberOfChannels": "0"},
        "channels-lie": {"ElementNumberOfChannels": "3"},
        "ascii-data": {"BinaryData": "False"},
        "headersize-local": {"HeaderSize": "64"},
        "objecttype-mesh": {"ObjectType": "Mesh"},
        "no-elementdatafile": {"ElementDataFile": None},
    }
    for name, changes in header_lies.items():
        add(name, meta_text(**changes) + raw)
    add("empty", b"")
    add("not-a-header", b"\x00\x01binary junk" * 20)
    add("truncated-raw", meta_text() + raw[:-7])
    add("trailing-bytes", meta_text() + raw + b"\x00" * 8)
    add("compressed-not-zlib", meta_text(CompressedData="True") + raw)
    add("compressed-size-larger", meta_text(CompressedData="True", CompressedDataSize=str(len(z) + 5000)) + z)
    add("compressed-size-smaller", meta_text(CompressedData="True", CompressedDataSize=str(len(z) // 2)) + z)
    add("compressed-truncated", meta_text(CompressedData="True") + z[: len(z) // 2])
    add("compressed-dimsize-larger", meta_text(CompressedData="True", DimSize="8 7 9") + z)
    add("compressed-bomb", meta_text(CompressedData="True") + zeros_stream(64 << 20, 15))
    nan = volume()
    nan[0, 1, 2] = NAN
    add("voxels-nan", meta_text() + nan.transpose(2, 1, 0).tobytes(), header_refuses=False)
    return cases


BUILDERS: tuple[Callable[[Path], list[Case]], ...] = (nifti_cases, nrrd_cases, metaimage_cases)
