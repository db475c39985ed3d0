"""Header fuzzing with Hypothesis (derandomized, bounded): whatever a header claims, the readers answer with an
image that matches :func:`medseg.io.read_header` or with a ``DataError`` - never another exception type.
"""

from __future__ import annotations

import bz2
import gzip
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.core.errors import DataError
from medseg.io import load_image, read_header
from tests.corpus.base import SHAPE, volume
from tests.corpus.dicom_zip import ct, dcm_bytes
from tests.corpus.raster import png_claiming
from tests.corpus.volumes import meta_text, nifti_bytes, nrrd_text

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
numbers = st.one_of(
    st.sampled_from([0.0, -1.0, 1.0, 2.5, float("nan"), float("inf"), -float("inf"), 1e300]),
    st.floats(-1e6, 1e6, allow_nan=False),
)
sizes = st.lists(st.integers(-2, 12), min_size=0, max_size=5)


def check_both_ways(path: Path, **options: Any) -> None:
    """read_header and load_image each return or raise DataError; a loaded image matches the header."""
    try:
        header = read_header(path, **options)
    except DataError:
        header = None
    try:
        image = load_image(path, **options)
    except DataError:
        return
    assert header is not None, f"{path.name} loaded although its header was refused"
    assert tuple(image.shape) == (header.channels, *header.shape)
    assert bool(np.isfinite(image.numpy()).all())


def fuzz_file(name: str, payload: bytes, **options: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(payload)
        check_both_ways(path, **options)


def vector(n: int) -> st.SearchStrategy[str]:
    return st.lists(numbers, min_size=n, max_size=n).map(lambda v: "(" + ",".join(f"{x!r}" for x in v) + ")")


def often(valid: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` about two times in three, else a value from ``other``: headers stay close to real ones."""
    return st.one_of(st.just(valid), st.just(valid), other)


VALID_SIZES = " ".join(map(str, SHAPE))


@FUZZ
@given(
    type_=often("float", st.sampled_from(["double", "short", "uchar", "int64", "block", "quaternion"])),
    dimension=often("3", st.sampled_from(["2", "4", "0", "-1", "x"])),
    sizes_=often(VALID_SIZES, sizes.map(lambda v: " ".join(map(str, v)))),
    encoding=often("raw", st.sampled_from(["gzip", "bzip2", "ascii", "hex", "zrl"])),
    endian=often("little", st.sampled_from(["big", None])),
    directions=often(
        "(0.9,0,0) (0,1.1,0) (0,0,2)",
        st.lists(st.one_of(st.just("none"), vector(3)), min_size=2, max_size=4).map(" ".join),
    ),
    origin=often("(1,2,3)", vector(3)),
    data_len=often(-1, st.integers(0, 3000)),
    data_file=often(None, st.sampled_from(["/dev/zero", "../x.raw", "LIST", "x%03d.raw 1 3 1"])),
)
def test_nrrd_headers(
    type_: str,
    dimension: str,
    sizes_: str,
    encoding: str,
    endian: str | None,
    directions: str,
    origin: str,
    data_len: int,
    data_file: str | None,
) -> None:
    fields = {
        "type": type_,
        "dimension": dimension,
        "sizes": sizes_,
        "encoding": encoding,
        "endian": endian,
        "space directions": directions,
        "space origin": origin,
        "data file": data_file,
    }
    raw = volume().transpose(2, 1, 0).tobytes()
    encoded = {"gzip": gzip.compress(raw), "bzip2": bz2.compress(raw), "hex": raw.hex().encode()}
    data = encoded.get(encoding, raw)
    data = data if data_len < 0 else (data * (1 + data_len // max(len(data), 1)))[:data_len]
    fuzz_file("fuzz.nrrd", nrrd_text(**fields) + data)


@FUZZ
@given(
    ndims=often("3", st.sampled_from(["2", "4", "0"])),
    dimsize=often(VALID_SIZES, sizes.map(lambda v: " ".join(map(str, v)))),
    element_type=often("MET_FLOAT", st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_DOUBLE", "MET_NONE", None])),
    spacing=often("0.9 1.1 2", st.lists(numbers, min_size=0, max_size=4).map(lambda v: " ".join(map(repr, v)))),
    offset=often("1 2 3", st.lists(numbers, min_size=3, max_size=3).map(lambda v: " ".join(map(repr, v)))),
    matrix=often("1 0 0 0 1 0 0 0 1", st.lists(numbers, min_size=9, max_size=9).map(lambda v: " ".join(map(repr, v)))),
    compressed=st.booleans(),
    compressed_size=often(None, st.integers(-5, 5000)),
    channels=often(None, st.sampled_from(["1", "3", "0", "x"])),
    data_len=often(-1, st.integers(0, 3000)),
    data_file=often("LOCAL", st.sampled_from(["/dev/zero", "../x.raw", "LIST", "x.raw"])),
)
def test_metaimage_headers(
    ndims: str,
    dimsize: str,
    element_type: str | None,
    spacing: str,
    offset: str,
    matrix: str,
    compressed: bool,
    compressed_size: int | None,
    channels: str | None,
    data_len: int,
    data_file: str,
) -> None:
    raw = volume().transpose(2, 1, 0).tobytes()
    data = zlib.compress(raw) if compressed else raw
    data = data if data_len < 0 else (data * (1 + data_len // max(len(data), 1)))[:data_len]
    header = meta_text(
        NDims=ndims,
        DimSize=dimsize,
        ElementType=element_type,
        ElementSpacing=spacing,
        Offset=offset,
        TransformMatrix=matrix,
        CompressedData=str(compressed),
        CompressedDataSize=None if compressed_size is None else str(compressed_size),
        ElementNumberOfChannels=channels,
        ElementDataFile=data_file,
    )
    fuzz_file("fuzz.mha", header + data)


NIFTI_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "dim_at": st.tuples(st.integers(0, 7), st.integers(-3, 40)),
    "pixdim_at": st.tuples(st.integers(0, 7), numbers),
    "datatype": st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 1536, 7]),
    "bitpix": st.sampled_from([8, 16, 32, 64, 24, 0]),
    "vox_offset": st.sampled_from([0.0, 100.0, 352.0, 352.5, 400.0, 1e9, float("nan")]),
    "qform_code": st.integers(-1, 5),
    "sform_code": st.integers(-1, 5),
    "quatern_b": numbers,
    "qoffset_x": numbers,
    "srow_x": st.lists(numbers, min_size=4, max_size=4),
    "scl_slope": numbers,
    "scl_inter": numbers,
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"", b"xyz"]),
}


@FUZZ
@given(
    changes=st.fixed_dictionaries({}, optional=NIFTI_FIELDS),
    cut=st.one_of(st.none(), st.integers(0, 1800)),
    gz=st.booleans(),
)
def test_nifti_headers(changes: dict[str, Any], cut: int | None, gz: bool) -> None:
    payload = nifti_bytes(**changes)
    payload = payload if cut is None else payload[:cut]
    if gz:
        fuzz_file("fuzz.nii.gz", gzip.compress(payload, 1))
    else:
        fuzz_file("fuzz.nii", payload)


DICOM_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "Rows": st.integers(0, 300),
    "Columns": st.integers(0, 300),
    "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64]),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.sampled_from(["1", "2", "0", "-1"]),
    "PixelSpacing": st.lists(numbers.map(repr), min_size=1, max_size=3),
    "ImageOrientationPatient": st.lists(numbers.map(repr), min_size=6, max_size=6),
    "ImagePositionPatient": st.lists(numbers.map(repr), min_size=2, max_size=3),
    "RescaleSlope": numbers.map(repr),
    "PixelRepresentation": st.integers(0, 1),
}


@FUZZ
@given(changes=st.fixed_dictionaries({}, optional=DICOM_FIELDS), cut=st.one_of(st.none(), st.integers(100, 40000)))
def test_dicom_headers(changes: dict[str, Any], cut: int | None) -> None:
    payload = dcm_bytes(ct(**changes))
    fuzz_file("fuzz.dcm", payload if cut is None else payload[:cut])


@FUZZ
@given(
    width=st.one_of(st.integers(1, 40), st.integers(0, 70000)),
    height=st.one_of(st.integers(1, 40), st.integers(0, 70000)),
    colour=often(0, st.sampled_from([2, 3, 4, 6, 1])),
    rows=st.integers(0, 50),
)
def test_png_headers(width: int, height: int, colour: int, rows: int) -> None:
    samples = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour, 1)
    idat = zlib.compress(bytes(min(rows, 40) * (1 + min(width, 40) * samples)))  # may be too short for the claim
    fuzz_file("fuzz.png", png_claiming(width, height, idat=idat, colour=colour))


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("base.nii", lambda: nifti_bytes()),
        ("base.nrrd", lambda: nrrd_text() + volume().transpose(2, 1, 0).tobytes()),
        ("base.mha", lambda: meta_text() + volume().transpose(2, 1, 0).tobytes()),
        ("base.dcm", lambda: dcm_bytes(ct())),
        ("base.png", lambda: png_claiming(8, 8, idat=zlib.compress(bytes(8 * 25)))),
    ],
)
def test_the_fuzz_base_files_are_valid(tmp_path: Path, name: str, payload: Callable[[], bytes]) -> None:
    path = tmp_path / name
    path.write_bytes(payload())
    image = load_image(path)
    assert tuple(image.shape) == (read_header(path).channels, *read_header(path).shape)
