"""verify_dataset: every fault of every case in one call, each with the right kind; clean datasets pass."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data import PROBLEM_KINDS, Manifest, Problem, format_problems, load_manifest, verify_dataset

AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [1.5, 0.0, 0.0, -30.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
SHIFTED = AFFINE + np.array([[0, 0, 0, 2.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def image(shape: tuple[int, ...] = (8, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label(shape: tuple[int, ...] = (8, 8, 8), top: int = 2) -> np.ndarray:
    data = np.zeros(shape, np.uint8)
    data[2:6, 2:6, 2:6] = 1
    data[3:5, 3:5, 3:5] = top
    return data


def write_msd(
    root: Path, cases: dict[str, tuple[np.ndarray | bytes | None, np.ndarray | None, np.ndarray]]
) -> Manifest:
    """Write an MSD folder; each case is ``(image or corrupt bytes or None, label or None, label affine)``."""
    for cid, (img, lab, lab_affine) in cases.items():
        if isinstance(img, bytes):
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            (root / "imagesTr" / f"{cid}.nii.gz").write_bytes(img)
        elif img is not None:
            write_nifti(root / "imagesTr" / f"{cid}.nii.gz", img)
        if lab is not None:
            write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab, lab_affine)
    write_nifti(root / "imagesTs" / "test_0.nii.gz", image())
    meta = {
        "name": "Broken",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "tumour"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": ["./imagesTs/test_0.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return load_manifest(root)


def kinds_by_case(problems: list[Problem]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for problem in problems:
        found.setdefault(problem.case_id, set()).add(problem.kind)
    return found


def test_every_fault_is_reported_in_one_call(tmp_path: Path) -> None:
    float_label = label().astype(np.float32)
    float_label[0, 0, 0] = 0.5
    bad_value = label()
    bad_value[7, 7, 7] = 7
    manifest = write_msd(
        tmp_path / "Task09_Broken",
        {
            "good": (image(), label(), AFFINE),
            "no_label": (image(), None, AFFINE),
            "no_image": (None, label(), AFFINE),
            "shape": (image(), label((8, 8, 6)), AFFINE),
            "affine": (image(), label(), SHIFTED),
            "value7": (image(), bad_value, AFFINE),
            "float": (image(), float_label, AFFINE),
            "corrupt": (b"this is not a nifti file", label(), AFFINE),
            "two_channels": (image((8, 8, 8, 2)), label(), AFFINE),
            "label_channels": (image(), np.stack([label(), label()], axis=-1), AFFINE),
        },
    )
    calls: list[tuple[int, int]] = []
    problems = verify_dataset(manifest, progress=lambda done, total: calls.append((done, total)))

    assert kinds_by_case(problems) == {
        "no_label": {"missing_label"},
        "no_image": {"missing_image"},
        "shape": {"shape_mismatch"},
        "affine": {"affine_mismatch"},
        "value7": {"label_values"},
        "float": {"label_values"},
        "corrupt": {"unreadable"},
        "two_channels": {"channel_count"},
        "label_channels": {"label_channels"},
    }
    assert calls == [(i, 11) for i in range(1, 12)]  # 10 training cases + 1 test case
    by_case = {p.case_id: p for p in problems}
    assert "7" in by_case["value7"].message and "2=tumour" in by_case["value7"].message
    assert "non-integer" in by_case["float"].message
    assert by_case["corrupt"].path == manifest.root / "imagesTr" / "corrupt.nii.gz"
    assert by_case["no_label"].path == manifest.root / "labelsTr" / "no_label.nii.gz"
    assert "(8, 8, 6)" in by_case["shape"].message and "2 mm" in by_case["affine"].message
    assert "2 channel(s), the dataset declares 1 (CT)" in by_case["two_channels"].message
    assert all(p.kind in PROBLEM_KINDS for p in problems)

    text = format_problems(problems)
    assert len(text.splitlines()) == len(problems)
    assert text.splitlines()[0].startswith("affine: affine_mismatch: ")


def test_clean_msd_dataset_has_no_problems(tmp_path: Path) -> None:
    cases = {f"case_{i}": (image(seed=i), label(), AFFINE) for i in range(3)}
    manifest = write_msd(tmp_path / "Task01_Clean", cases)
    assert verify_dataset(manifest) == []
    assert format_problems([]) == ""


def test_dataset_without_training_cases_is_a_problem(tmp_path: Path) -> None:
    problems = verify_dataset(write_msd(tmp_path / "Task02_Empty", {}))
    assert [(p.case_id, p.kind) for p in problems] == [("(dataset)", "no_cases")]


def write_nnunet(root: Path, n_cases: int = 2) -> Manifest:
    for i in range(n_cases):
        for ch in range(2):
            write_nifti(root / "imagesTr" / f"c{i}_{ch:04d}.nii.gz", image(seed=10 * i + ch))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label(top=1))
    meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1}}
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return load_manifest(root)


def test_nnunet_channel_files(tmp_path: Path) -> None:
    root = tmp_path / "Dataset004_Two"
    manifest = write_nnunet(root, n_cases=3)
    assert verify_dataset(manifest) == []

    write_nifti(root / "imagesTr" / "c0_0001.nii.gz", image(), SHIFTED)  # channel off the grid of channel 0
    (root / "imagesTr" / "c1_0001.nii.gz").write_bytes(b"\x1f\x8b broken gzip")
    write_nifti(root / "labelsTr" / "c2.nii.gz", label(top=2))  # 2 is not declared
    problems = verify_dataset(manifest)
    assert {(p.case_id, p.kind, p.path.name) for p in problems if p.path} == {
        ("c0", "affine_mismatch", "c0_0001.nii.gz"),
        ("c1", "unreadable", "c1_0001.nii.gz"),
        ("c2", "label_values", "c2.nii.gz"),
    }


@pytest.mark.parametrize(("value", "ok"), [(5, True), (-1, False)])
def test_undeclared_labels_only_need_non_negative_integers(tmp_path: Path, value: int, ok: bool) -> None:
    root = tmp_path / "pairs"
    data = label().astype(np.int16)
    data[0, 0, 0] = value
    write_nifti(root / "images" / "a.nii.gz", image())
    write_nifti(root / "labels" / "a.nii.gz", data)
    manifest = load_manifest(root)
    assert manifest.label_names == ()
    problems = verify_dataset(manifest)
    assert (problems == []) is ok
    if not ok:
        assert [p.kind for p in problems] == ["label_values"] and "-1" in problems[0].message
