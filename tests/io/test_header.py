"""``read_header`` and the refusals of the input boundary, one rule at a time (the corpus tests cover them in bulk)."""

from __future__ import annotations

import gzip
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from PIL import Image

from medseg.core.errors import ConfigError, DataError
from medseg.io import (
    ImageHeader,
    VoxelLimitError,
    load_channels,
    load_image,
    read_header,
    save_image,
)
from medseg.io.checks import decompressed_size
from tests.corpus.base import oblique_affine, volume, zeros_stream
from tests.corpus.volumes import meta_text, nifti_bytes, nrrd_text


def _image(data: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(oblique_affine()))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_read_header_describes_the_file_without_decoding(tmp_path: Path, suffix: str) -> None:
    path = save_image(_image(volume()[None]), tmp_path / f"v{suffix}")
    header = read_header(path)
    assert isinstance(header, ImageHeader)
    assert header.shape == (8, 7, 6) and header.channels == 1 and header.voxels == 336
    assert header.dtype == "float32" and not header.external_data and header.data_file == path
    np.testing.assert_allclose(header.spacing, (0.9, 1.1, 2.0), atol=1e-5)
    assert header.bytes_expected == 336 * 4
    compressed = suffix != ".nii"  # SimpleITK compresses NRRD and MetaImage when medseg writes them
    assert (header.bytes_present is None) == compressed
    assert header.compression != "none" if compressed else header.compression == "none"
    image = load_image(path)
    assert tuple(image.shape) == (header.channels, *header.shape)


def test_read_header_of_vector_png_dicom_and_series(tmp_path: Path) -> None:
    two = save_image(_image(np.stack([volume(), volume(1)])), tmp_path / "two.nrrd")
    assert read_header(two).channels == 2 and read_header(two).voxels == 672
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    png = read_header(tmp_path / "rgb.png")
    assert (png.format, png.shape, png.channels) == ("raster", (32, 24, 1), 3)
    from pydicom.data import get_testdata_file

    ct = read_header(get_testdata_file("CT_small.dcm"))
    assert (ct.format, ct.shape, ct.dtype) == ("dicom", (128, 128, 1), "int16")
    assert ct.bytes_expected == ct.bytes_present == 128 * 128 * 2


def test_detached_data_needs_the_opt_in_and_must_sit_next_to_its_header(tmp_path: Path) -> None:
    raw = volume().transpose(2, 1, 0).tobytes()
    (tmp_path / "data.raw").write_bytes(raw)
    header = tmp_path / "image.nhdr"
    header.write_bytes(nrrd_text(data_file="data.raw")[:-1])
    with pytest.raises(DataError, match="outside the file") as err:
        load_image(header)
    assert "allow_external_data=True" in str(err.value)
    described = read_header(header, allow_external_data=True)
    assert described.external_data and described.data_file == tmp_path / "data.raw"
    np.testing.assert_allclose(load_image(header, allow_external_data=True)[0].numpy(), volume(), rtol=0, atol=0)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "image.mhd").write_bytes(meta_text(ElementDataFile="../data.raw"))
    with pytest.raises(DataError, match="without '..'"):
        load_image(sub / "image.mhd", allow_external_data=True)
    (sub / "dev.mhd").write_bytes(meta_text(ElementDataFile="/dev/zero"))
    with pytest.raises(DataError, match="relative to the header's folder"):
        load_image(sub / "dev.mhd", allow_external_data=True)


def test_max_voxels_is_checked_before_the_bytes(tmp_path: Path) -> None:
    huge = tmp_path / "huge.nii"
    huge.write_bytes(nifti_bytes(dim=[3, 4000, 4000, 4000, 1, 1, 1, 1]))
    with pytest.raises(VoxelLimitError, match="claims 64000000000 voxels") as err:
        load_image(huge, max_voxels=10**6)
    assert err.value.voxels == 64 * 10**9 and err.value.limit == 10**6
    with pytest.raises(DataError, match="holds 1344 bytes of pixel data; expected 256000000000 bytes"):
        read_header(huge)  # without a cap the size lie is what is refused
    ok = save_image(_image(volume()[None]), tmp_path / "ok.nii.gz")
    with pytest.raises(VoxelLimitError):
        read_header(ok, max_voxels=335)
    assert read_header(ok, max_voxels=336).voxels == 336


def test_nonfinite_voxels_are_refused_or_zeroed(tmp_path: Path) -> None:
    data = volume()
    data[1, 2, 3], data[4, 5, 0] = np.nan, -np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, oblique_affine()), path)
    with pytest.raises(DataError, match="holds 2 non-finite voxel values"):
        load_image(path)
    image = load_image(path, nonfinite="zero")
    assert float(image[0, 1, 2, 3]) == 0.0 and float(image[0, 4, 5, 0]) == 0.0
    np.testing.assert_array_equal(image[0, 0].numpy(), data[0])
    with pytest.raises(ConfigError, match="nonfinite='nan'"):
        load_image(path, nonfinite="nan")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="non-finite"):
        load_channels([path])
    assert load_channels([path], nonfinite="zero").shape == (1, 8, 7, 6)


def test_a_short_or_overlong_gzip_stream_names_expected_and_found(tmp_path: Path) -> None:
    good = nifti_bytes()
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(good[:-100]))
    assert read_header(short).bytes_present is None  # only the decode can count a gzip stream
    with pytest.raises(DataError, match="holds 1244 bytes of pixel data; expected 1344 bytes"):
        load_image(short)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(good) + zeros_stream(64 << 20, 31))
    start = time.perf_counter()
    with pytest.raises(DataError, match="holds more than 1344 bytes"):
        load_image(bomb)
    assert time.perf_counter() - start < 2.0  # decoding stops one byte past the claim


@pytest.mark.parametrize("kind", ["zlib", "gzip", "bzip2"])
def test_decompressed_size_is_bounded_by_the_claim(tmp_path: Path, kind: str) -> None:
    import bz2

    payload = bytes(range(256)) * 4000
    blob = {"zlib": zlib.compress, "gzip": gzip.compress, "bzip2": bz2.compress}[kind](payload)
    path = tmp_path / "blob"
    path.write_bytes(blob + (gzip.compress(b"more") if kind == "gzip" else b""))
    with open(path, "rb") as fh:
        assert decompressed_size(path, fh, kind, 10_000) == 10_001  # stops one byte past the claim
    with open(path, "rb") as fh:
        exact = len(payload) + (4 if kind == "gzip" else 0)  # concatenated gzip members are counted too
        assert decompressed_size(path, fh, kind, 10**9) == exact
    with open(path, "rb") as fh:
        assert decompressed_size(path, fh, kind, 10**9, limit=len(blob) // 2) < len(payload)
    path.write_bytes(b"\x00" * 64)
    with open(path, "rb") as fh, pytest.raises(DataError, match="stream is corrupt"):
        decompressed_size(path, fh, kind, 100)


def test_devices_and_folders_are_not_image_files(tmp_path: Path) -> None:
    (tmp_path / "zero.nrrd").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path / "zero.nrrd")
    with pytest.raises(DataError, match="not found"):
        read_header(tmp_path / "missing.mha")


def test_dicom_pixel_spacing_present_but_invalid_is_refused_without_patient_geometry(tmp_path: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.PixelSpacing = ["0", "0.5"]
    ds.save_as(tmp_path / "flat.dcm")
    with pytest.raises(DataError, match=r"invalid PixelSpacing \[0, 0.5\]"):
        read_header(tmp_path / "flat.dcm")
    del ds.PixelSpacing
    ds.save_as(tmp_path / "none.dcm")
    assert load_image(tmp_path / "none.dcm").meta["geometry_source"] == "default"


def test_nrrd_spacings_without_directions_and_sitk_files_round_trip(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    img.SetSpacing((0.5, 0.25, 3.0))
    sitk.WriteImage(img, str(tmp_path / "plain.nrrd"), useCompression=False)
    header = read_header(tmp_path / "plain.nrrd")
    assert header.shape == (5, 4, 3) and header.dtype == "int16" and header.bytes_present == 120
    np.testing.assert_allclose(header.spacing, (0.5, 0.25, 3.0))
    raw = np.arange(60, dtype=np.int16).tobytes()
    plain = {"space": None, "space directions": None, "space origin": None}
    spacings = nrrd_text(type="short", sizes="5 4 3", **plain)
    (tmp_path / "spacings.nrrd").write_bytes(spacings.replace(b"kinds:", b"spacings: 0.5 0.25 3\nkinds:") + raw)
    np.testing.assert_allclose(read_header(tmp_path / "spacings.nrrd").spacing, (0.5, 0.25, 3.0))
    assert load_image(tmp_path / "spacings.nrrd").shape == (1, 5, 4, 3)
