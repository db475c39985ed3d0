"""Geometry round trips: oblique, anisotropic, LPS-stored images through NIfTI, NRRD and MetaImage."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.io import (
    affine_to_sitk,
    load_channels,
    load_image,
    ras_to_lps,
    same_geometry,
    save_image,
    save_mask,
    sitk_to_affine,
    spacing_from_affine,
)

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
SUFFIXES = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"]


def write_reference(path: Path, data: np.ndarray, affine_ras: np.ndarray) -> None:
    """Write (X, Y, Z) data with a RAS affine using the format's own library, independently of medseg."""
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(data, affine_ras), str(path))
        return
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = FLIP @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).reshape(-1).tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))


def sitk_geometry(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return (
        np.asarray(img.GetOrigin()),
        np.asarray(img.GetSpacing()),
        np.asarray(img.GetDirection()).reshape(3, 3),
        sitk.GetArrayFromImage(img).transpose(2, 1, 0),
    )


def world_of(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.append(ijk, 1.0))[:3]


def centroid(labels: np.ndarray, value: int) -> np.ndarray:
    return np.argwhere(labels == value).mean(axis=0)


def test_helpers_invert_each_other(oblique_affine: np.ndarray) -> None:
    origin, spacing, direction = affine_to_sitk(oblique_affine)
    np.testing.assert_allclose(spacing, (0.7, 1.3, 3.0), atol=1e-12)
    np.testing.assert_allclose(spacing_from_affine(oblique_affine), (0.7, 1.3, 3.0), atol=1e-12)
    np.testing.assert_allclose(origin, (-12.25, 45.5, 78.75), atol=1e-12)
    np.testing.assert_allclose(sitk_to_affine(origin, spacing, direction), oblique_affine, atol=1e-12)
    np.testing.assert_allclose(ras_to_lps(ras_to_lps(oblique_affine)), oblique_affine)


@pytest.mark.parametrize("ref_suffix", [".nii.gz", ".nrrd", ".mha"])
def test_oblique_round_trip(tmp_path: Path, oblique_affine, phantom, intensity, ref_suffix: str) -> None:
    ref_path = tmp_path / f"ref{ref_suffix}"
    write_reference(ref_path, intensity, oblique_affine)
    ref = load_image(ref_path)

    assert isinstance(ref, MetaTensor)
    assert ref.shape == (1, *intensity.shape) and ref.dtype == torch.float32
    assert ref.affine.dtype == torch.float64
    atol = 1e-5 if ref_suffix == ".nii.gz" else 1e-9  # NIfTI stores the sform as float32
    np.testing.assert_allclose(ref.affine.numpy(), oblique_affine, atol=atol)
    np.testing.assert_array_equal(ref[0].numpy(), intensity)
    assert ref.meta["space"] == "RAS"
    assert ref.meta["filename_or_obj"] == str(ref_path)
    np.testing.assert_array_equal(ref.meta["spatial_shape"], intensity.shape)
    np.testing.assert_array_equal(ref.meta["original_affine"], ref.affine.numpy())

    ref_origin, ref_spacing, ref_direction = (np.asarray(v) for v in affine_to_sitk(oblique_affine))
    for out_suffix in SUFFIXES:
        out = save_mask(torch.as_tensor(phantom[None]), ref, tmp_path / f"mask{out_suffix}")
        assert out.exists()
        detached = out_suffix in (".nhdr", ".mhd")  # the data file sits next to the header: an explicit opt-in
        if detached:
            with pytest.raises(DataError, match="outside the file"):
                load_image(out)
        back = load_image(out, allow_external_data=detached)
        assert back.shape == ref.shape
        np.testing.assert_array_equal(back[0].numpy(), phantom)
        assert same_geometry(back, ref)
        origin, spacing, direction, voxels = sitk_geometry(out)
        tol = 1e-5 if out_suffix.startswith(".nii") else 1e-6
        np.testing.assert_allclose(origin, ref_origin, atol=tol)
        np.testing.assert_allclose(spacing, ref_spacing, atol=tol)
        np.testing.assert_allclose(direction, ref_direction.reshape(3, 3), atol=tol)
        np.testing.assert_array_equal(voxels, phantom)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files


def test_lps_nrrd_with_direction(tmp_path: Path, phantom) -> None:
    # Stored by SimpleITK in LPS: 30° rotation about z, axis flips, anisotropic spacing.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, -1.0])
    spacing, origin = (0.9, 1.1, 2.5), (30.0, -20.0, 55.0)
    img = sitk.GetImageFromArray(np.zeros(phantom.shape[::-1], np.float32))
    img.SetDirection(direction.reshape(-1).tolist())
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    ref_path = tmp_path / "lps.nrrd"
    sitk.WriteImage(img, str(ref_path))

    ref = load_image(ref_path)
    expected = np.eye(4)
    expected[:3, :3] = direction * np.asarray(spacing)
    expected[:3, 3] = origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected
    np.testing.assert_allclose(ref.affine.numpy(), expected, atol=1e-9)
    assert ref.meta["source_format"] == "nrrd"

    out = save_mask(phantom, ref, tmp_path / "mask.nii.gz")
    saved = nib.load(str(out))
    assert saved.get_data_dtype() == np.uint8
    assert int(saved.header["sform_code"]) == 1 and int(saved.header["qform_code"]) == 1
    for label in (1, 2):
        ijk = centroid(np.asarray(saved.dataobj), label)
        lps_point = np.asarray(img.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
        ras_point = lps_point * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(world_of(saved.affine, ijk), ras_point, atol=1e-4)
        np.testing.assert_allclose(world_of(saved.get_qform(), ijk), ras_point, atol=1e-4)


def test_nifti_reference_mask_as_nrrd(tmp_path: Path, oblique_affine, phantom, intensity) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_reference(ref_path, intensity, oblique_affine)
    out = save_mask(phantom, ref_path, tmp_path / "mask.nrrd")  # reference given as a path
    img = sitk.ReadImage(str(out))
    assert img.GetPixelID() == sitk.sitkUInt8
    ref_nifti = nib.load(str(ref_path))
    for label in (1, 2):
        ijk = centroid(phantom, label)
        lps_point = np.asarray(img.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
        np.testing.assert_allclose(lps_point * [-1, -1, 1], world_of(ref_nifti.affine, ijk), atol=1e-4)


def test_mask_dtype_and_shape_checks(tmp_path: Path, oblique_affine, phantom, intensity) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_reference(ref_path, intensity, oblique_affine)
    ref = load_image(ref_path)
    big = phantom.astype(np.int64) * 300
    assert nib.load(str(save_mask(big, ref, tmp_path / "big.nii"))).get_data_dtype() == np.uint16
    neg = phantom.astype(np.int32) - 1
    assert nib.load(str(save_mask(neg, ref, tmp_path / "neg.nii"))).get_data_dtype() == np.int32
    with pytest.raises(ModelInputError, match="spatial shape"):
        save_mask(phantom[:-1], ref, tmp_path / "bad.nii.gz")
    with pytest.raises(ModelInputError, match="non-integer"):
        save_mask(phantom + 0.5, ref, tmp_path / "bad.nii.gz")
    with pytest.raises(ModelInputError, match="reference"):
        save_mask(phantom, torch.zeros(1, *phantom.shape), tmp_path / "bad.nii.gz")
    with pytest.raises(DataError, match=r"bad\.png.*\.nii\.gz"):
        save_mask(phantom, ref, tmp_path / "bad.png")
    assert not list(tmp_path.glob("bad*"))


def test_save_image_multichannel_and_load_channels(tmp_path: Path, oblique_affine, intensity) -> None:
    two = MetaTensor(torch.as_tensor(np.stack([intensity, 2 * intensity])), affine=torch.as_tensor(oblique_affine))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        back = load_image(save_image(two, tmp_path / f"two{suffix}"))
        assert back.shape == two.shape
        np.testing.assert_array_equal(back.numpy(), two.numpy())
        assert same_geometry(back, two)

    paths = [save_image(two[c : c + 1], tmp_path / f"ch{c}.nii.gz") for c in range(2)]
    stacked = load_channels(paths)
    assert stacked.shape == two.shape and same_geometry(stacked, two)
    np.testing.assert_array_equal(stacked.numpy(), two.numpy())

    shifted = oblique_affine.copy()
    shifted[0, 3] += 1.0
    other = save_image(MetaTensor(torch.as_tensor(intensity), affine=torch.as_tensor(shifted)), tmp_path / "x.nrrd")
    with pytest.raises(DataError, match=r"x\.nrrd and ch0\.nii\.gz differ"):
        load_channels([paths[0], other])
    with pytest.raises(DataError, match="2 channels"):
        load_channels([tmp_path / "two.nii.gz"])


def test_four_d_nifti_is_channel_first(tmp_path: Path, oblique_affine, intensity) -> None:
    data = np.stack([intensity, -intensity, intensity + 1], axis=-1)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(data, oblique_affine), str(tmp_path / "four.nii.gz"))
    img = load_image(tmp_path / "four.nii.gz")
    assert img.shape == (3, *intensity.shape)
    np.testing.assert_array_equal(img[1].numpy(), -intensity)


def test_read_errors_name_the_file(tmp_path: Path, oblique_affine, intensity) -> None:
    with pytest.raises(DataError, match="missing.nii.gz"):
        load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "image.xyz").write_text("x")
    with pytest.raises(DataError, match=r"image\.xyz.*unsupported suffix") as info:
        load_image(tmp_path / "image.xyz")
    assert info.value.path == str(tmp_path / "image.xyz")

    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(intensity, oblique_affine), str(good))
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00not gzip at all" * 10)
    bad_nrrd = tmp_path / "bad.nrrd"
    bad_nrrd.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n")
    for bad in (truncated, garbage, bad_nrrd):
        with pytest.raises(DataError, match=bad.name) as info:
            load_image(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="series_uid"):
        load_image(good, series_uid="1.2.3")
