"""Dataset fingerprint: per-case geometry, foreground intensity statistics, label statistics, the cache, and
agreement with nnU-Net v2's own ``DatasetFingerprintExtractor`` on the same (exported) data."""

from __future__ import annotations

import json
import multiprocessing.pool
import os
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.core.errors import DataError
from medseg.data import load_manifest
from medseg.data.fingerprint import (
    FINGERPRINT_FILE,
    DatasetFingerprint,
    compute_fingerprint,
    files_digest,
    load_or_compute_fingerprint,
    median_shape_at_spacing,
)
from tests.helpers import TINY_SHAPE, write_msd


def _write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]) -> None:
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")


def _known_dataset(root: Path) -> Path:
    """Two cases with exactly known foreground values, zero padding around the body, and two objects of label 1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, spacing in enumerate([(1.0, 1.0, 3.0), (0.8, 0.8, 5.0)]):
        image = np.zeros((20, 16, 12), np.float32)
        image[2:18, 3:13, 1:11] = 5.0  # body: the non-zero box is 16 x 10 x 10
        label = np.zeros(image.shape, np.uint8)
        label[4:6, 4:6, 2:4] = 1  # object of 8 voxels
        label[10:13, 8:11, 5:8] = 1  # object of 27 voxels
        label[14:16, 4:6, 8:9] = 2  # 4 voxels
        image[label == 1] = 100.0 + i
        image[label == 2] = 200.0
        _write_case(root, f"c{i}", image, label, spacing)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"name": "known", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "2": "b"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training, "test": []}))
    return root


def test_known_values(tmp_path: Path) -> None:
    fp = compute_fingerprint(load_manifest(_known_dataset(tmp_path / "d")), max_samples=2000)
    assert [c.spacing for c in fp.cases] == [pytest.approx((1.0, 1.0, 3.0)), pytest.approx((0.8, 0.8, 5.0))]
    assert fp.cases[0].shape == (20, 16, 12)
    assert fp.cases[0].shape_after_crop == (16, 10, 10)
    assert fp.cases[0].class_voxels == (20 * 16 * 12 - 39, 35, 4)
    assert fp.cases[0].object_sizes == {"1": [27, 8], "2": [4]}
    assert fp.median_spacing == pytest.approx((0.9, 0.9, 4.0))
    assert fp.median_relative_size_after_crop == pytest.approx(1600 / 3840)
    ch = fp.channels[0]
    assert (ch.name, ch.modality, ch.n_samples) == ("CT", "CT", 2000)
    assert ch.min in (100.0, 101.0) and ch.max == 200.0
    share_b = 4 / 39  # foreground voxels of label 2 in each case
    assert ch.percentile_99_5 == 200.0 and 100.0 <= ch.percentile_00_5 <= 101.0
    assert ch.mean == pytest.approx((1 - share_b) * 100.5 + share_b * 200.0, abs=4.0)
    assert fp.class_frequencies[2] == pytest.approx(8 / 7680)
    assert median_shape_at_spacing(fp, (1.0, 1.0, 4.0)) == pytest.approx((14.4, 9.0, 10.0 * 4.0 / 4.0 * 1.0))


def test_round_trip_and_cache_invalidation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_msd(tmp_path / "msd", n_cases=3)
    manifest = load_manifest(root)
    first = load_or_compute_fingerprint(manifest, max_samples=3000)
    cache = root / FINGERPRINT_FILE
    assert cache.is_file()
    assert DatasetFingerprint.from_dict(json.loads(cache.read_text())) == first
    assert load_manifest(root).cases == manifest.cases  # the cache file does not disturb the layout
    # unchanged files: the cache is used (a tampered number in it shows through)
    data = json.loads(cache.read_text())
    data["channels"][0]["mean"] = 12345.0
    cache.write_text(json.dumps(data))
    assert load_or_compute_fingerprint(manifest, max_samples=3000).channels[0].mean == 12345.0
    # other sampling settings: recomputed
    assert load_or_compute_fingerprint(manifest, max_samples=6000).channels[0].mean == pytest.approx(
        first.channels[0].mean, rel=0.05
    )
    # a rewritten image (new content, new mtime): recomputed, and the new numbers are seen
    image_path = manifest.cases[0].images[0]
    img = nib.load(image_path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 10.0, img.affine), image_path)
    st = image_path.stat()
    os.utime(image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_or_compute_fingerprint(manifest, max_samples=6000)
    assert again.digest != first.digest
    assert again.channels[0].max > 5 * first.channels[0].max


def test_digest_follows_file_set(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "msd", n_cases=3)
    before = files_digest(load_manifest(root))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert files_digest(load_manifest(root)) != before


def test_unwritable_cache_is_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_msd(tmp_path / "msd", n_cases=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fp = load_or_compute_fingerprint(load_manifest(root), blocker / "fp.json", max_samples=1000)
    assert len(fp.cases) == 2 and "could not save" in caplog.text


def test_label_off_grid_is_refused(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "msd", n_cases=2)
    label = root / "labelsTr" / "case_00.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), label)
    with pytest.raises(DataError, match="label shape"):
        compute_fingerprint(load_manifest(root), max_samples=1000)


# ---------------------------------------------------------------------------------------------- nnU-Net agreement


def _nnunet_fingerprint(raw: Path, folder: Path, preprocessed: Path, max_samples: int) -> dict:
    """Run nnU-Net v2's ``DatasetFingerprintExtractor`` in this process (worker pool replaced by threads)."""
    from medseg.integrations.nnunet.shim import ensure_nnunet_importable

    ensure_nnunet_importable()
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe

    patch = pytest.MonkeyPatch()
    threads = types.SimpleNamespace(get_context=lambda _: types.SimpleNamespace(Pool=multiprocessing.pool.ThreadPool))
    patch.setattr(fe, "multiprocessing", threads)
    patch.setattr(fe, "nnUNet_raw", str(raw))
    patch.setattr(fe, "nnUNet_preprocessed", str(preprocessed))
    try:
        extractor = fe.DatasetFingerprintExtractor(folder.name, num_processes=1)
        extractor.show_progress_bar = False
        extractor.num_foreground_voxels_for_intensitystats = max_samples
        return extractor.run(overwrite_existing=True)
    finally:
        patch.undo()


@pytest.mark.integration
def test_agrees_with_nnunet_fingerprint(tmp_path: Path) -> None:
    from medseg.integrations.nnunet import export_nnunet_raw

    data = write_msd(tmp_path / "msd", n_cases=3)
    folder = export_nnunet_raw(data, tmp_path / "raw", 501)
    max_samples = 30_000
    theirs = _nnunet_fingerprint(tmp_path / "raw", folder, tmp_path / "pre", max_samples)
    mine = compute_fingerprint(load_manifest(folder), max_samples=max_samples)  # same files nnU-Net read
    order = sorted(range(len(mine.cases)), key=lambda i: mine.cases[i].case_id)
    # nnU-Net's axes are (Z, Y, X) of the file: medseg's RAS (X, Y, Z) reversed for these RAS-stored files
    assert np.allclose([mine.cases[i].spacing[::-1] for i in order], theirs["spacings"], rtol=1e-6)
    assert [list(mine.cases[i].shape_after_crop[::-1]) for i in order] == [list(s) for s in theirs["shapes_after_crop"]]
    assert mine.cases[0].shape == TINY_SHAPE
    assert mine.median_relative_size_after_crop == pytest.approx(theirs["median_relative_size_after_cropping"])
    stats = (
        theirs["foreground_intensity_properties_per_channel"]["0"]
        if "0" in theirs["foreground_intensity_properties_per_channel"]
        else theirs["foreground_intensity_properties_per_channel"][0]
    )
    ch = mine.channels[0]
    for key in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"):
        assert getattr(ch, key) == pytest.approx(stats[key], rel=1e-5, abs=1e-6), key
