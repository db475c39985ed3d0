"""Layout detection and manifests for MSD, nnU-Net raw and paired folders, and the errors for bad folders.

Layouts read no voxels, so most folders here hold tiny NIfTI files only where the file content matters to nobody;
the geometry checks live in test_verify.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.core.errors import DataError
from medseg.core.keys import CASE_ID, IMAGE, LABEL
from medseg.data import Manifest, detect_layout, infer_modality, load_manifest, strip_image_extension

AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [1.5, 0.0, 0.0, -30.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path: Path, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((8, 8, 8), np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_msd(root: Path, ids: tuple[str, ...] = ("liver_2", "liver_0", "liver_1")) -> Path:
    for cid in ids:
        write_nifti(root / "imagesTr" / f"{cid}.nii.gz")
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    write_nifti(root / "imagesTs" / "liver_9.nii.gz")
    write_json(
        root / "dataset.json",
        {
            "name": "Liver",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": len(ids),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
            "test": ["./imagesTs/liver_9.nii.gz"],
        },
    )
    return root


def make_nnunet(root: Path, ids: tuple[str, ...] = ("prostate_01", "prostate_00"), **meta: object) -> Path:
    for cid in ids:
        for ch in range(2):
            write_nifti(root / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    for ch in range(2):
        write_nifti(root / "imagesTs" / f"prostate_99_{ch:04d}.nii.gz")
    dataset = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
    }
    write_json(root / "dataset.json", {**dataset, **meta})
    return root


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_msd_layout(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "Task03_Liver")
    assert detect_layout(root) == "msd"
    m = load_manifest(root)
    assert (m.layout, m.name, m.modality, m.file_ending) == ("msd", "Liver", "CT", ".nii.gz")
    assert m.channel_names == ("CT",)
    assert m.label_names == ("background", "liver", "cancer")
    assert [c.case_id for c in m.cases] == ["liver_0", "liver_1", "liver_2"]
    assert m.cases[0].images == (root / "imagesTr" / "liver_0.nii.gz",)
    assert m.cases[0].label == root / "labelsTr" / "liver_0.nii.gz"
    assert all(p.is_file() for c in m.cases for p in (*c.images, c.label))
    assert [(c.case_id, c.label) for c in m.test_cases] == [("liver_9", None)]
    item = m.cases[0].as_dict()
    assert item == {IMAGE: [str(m.cases[0].images[0])], LABEL: str(m.cases[0].label), CASE_ID: "liver_0"}


def test_msd_missing_label_file_is_not_fatal(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "Task03_Liver")
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    m = load_manifest(root)
    assert len(m.cases) == 3 and not m.cases[1].label.exists()


def test_nnunet_layout_two_channels(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "Dataset005_Prostate")
    assert detect_layout(root) == "nnunet"
    m = load_manifest(root)
    assert (m.layout, m.name, m.modality, m.file_ending) == ("nnunet", "Dataset005_Prostate", "MRI", ".nii.gz")
    assert m.channel_names == ("T2", "ADC") and m.num_channels == 2
    assert m.label_names == ("background", "PZ", "TZ")
    assert [c.case_id for c in m.cases] == ["prostate_00", "prostate_01"]
    images = root / "imagesTr"
    assert m.cases[0].images == (images / "prostate_00_0000.nii.gz", images / "prostate_00_0001.nii.gz")
    assert m.cases[0].label == root / "labelsTr" / "prostate_00.nii.gz"
    assert [c.case_id for c in m.test_cases] == ["prostate_99"] and m.test_cases[0].label is None
    assert m.cases[0].as_dict()[IMAGE] == [str(p) for p in m.cases[0].images]


def test_nnunet_detected_by_channel_names_whatever_the_folder_name(tmp_path: Path) -> None:
    assert detect_layout(make_nnunet(tmp_path / "prostate")) == "nnunet"


def test_paired_layout_plain(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "unlabelled.nii", ".DS_Store"):
        touch(root / "images" / name)
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        touch(root / "labels" / name)
    assert detect_layout(root) == "paired"
    m = load_manifest(root)
    assert [c.case_id for c in m.cases] == ["a", "b", "c"]
    assert m.cases[0].images == (root / "images" / "a.nrrd",) and m.cases[0].label == root / "labels" / "a.nii.gz"
    assert [(c.case_id, c.label) for c in m.test_cases] == [("unlabelled", None)]
    assert m.label_names == () and m.num_labels is None  # inferred later from the label files
    assert m.channel_names == ("channel_0",) and m.modality == "unknown"


def test_paired_layout_with_channel_suffix_and_metadata(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for cid in ("p2", "p1", "p3"):
        for ch in range(2):
            touch(root / "images" / f"{cid}_{ch:04d}.nii.gz")
    touch(root / "labels" / "p1.nii.gz")
    touch(root / "labels" / "p2.nii.gz")
    (root / "dataset.yaml").write_text("name: brains\nmodality: MR\nlabels:\n  0: background\n  1: tumour\n")
    m = load_manifest(root)
    assert m.layout == "paired" and m.name == "brains"
    assert [c.case_id for c in m.cases] == ["p1", "p2"] and [c.case_id for c in m.test_cases] == ["p3"]
    assert m.cases[0].images == (root / "images" / "p1_0000.nii.gz", root / "images" / "p1_0001.nii.gz")
    assert m.channel_names == ("channel_0", "channel_1")
    assert m.label_names == ("background", "tumour") and m.modality == "MRI"


def test_paired_suffix_kept_when_labels_use_the_full_name(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for name in ("case_0000.nii.gz", "case_0001.nii.gz"):
        touch(root / "images" / name)
        touch(root / "labels" / name)
    write_json(root / "dataset.json", {"labels": {"background": 0, "vessel": 1}, "modality": {"0": "CT"}})
    m = load_manifest(root)
    assert [c.case_id for c in m.cases] == ["case_0000", "case_0001"]
    assert (m.channel_names, m.modality, m.label_names) == (("CT",), "CT", ("background", "vessel"))


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    m = load_manifest(make_nnunet(tmp_path / "Dataset005_Prostate"))
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["CT"], "CT"),
        (["noNorm", "CT"], "CT"),
        (["FLAIR", "T1w", "t1gd", "T2w"], "MRI"),
        (["T2", "ADC"], "MRI"),
        (["MRI"], "MRI"),
        (["PET"], "PET"),
        (["ultrasound"], "US"),
        (["zscore"], "unknown"),
        (["Structure"], "unknown"),
    ],
)
def test_infer_modality(names: list[str], expected: str) -> None:
    assert infer_modality(names) == expected


def test_strip_image_extension() -> None:
    assert strip_image_extension("a.b_0000.nii.gz") == "a.b_0000"
    assert strip_image_extension("x.nrrd") == "x" and strip_image_extension("x.mha") == "x"
    assert strip_image_extension("notes.txt") is None


# ------------------------------------------------------------------------------------------------ bad folders


def _bad_json(root: Path) -> None:
    root.mkdir()
    (root / "dataset.json").write_text('{"training": [],}')


def _msd_without_labels(root: Path) -> None:
    make_msd(root)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    write_json(root / "dataset.json", meta)


def _nnunet_missing_channel(root: Path) -> None:
    make_nnunet(root)
    (root / "imagesTr" / "prostate_01_0001.nii.gz").unlink()


def _nnunet_without_suffix(root: Path) -> None:
    make_nnunet(root)
    touch(root / "imagesTr" / "stray.nii.gz")


def _nested(root: Path) -> None:
    make_msd(root / "Task03_Liver")


def _unknown(root: Path) -> None:
    touch(root / "scan.nii.gz")


def _duplicate_ids(root: Path) -> None:
    for name in ("a.nii.gz", "a.nrrd"):
        touch(root / "images" / name)
    touch(root / "labels" / "a.nii.gz")


def _json_without_layout_keys(root: Path) -> None:
    write_json(root / "dataset.json", {"name": "x"})


def _nnunet_name_without_json(root: Path) -> None:
    touch(root / "imagesTr" / "a_0000.nii.gz")


BAD_FOLDERS = {
    "empty": (lambda root: root.mkdir(), ["is empty", "expected one of: MSD (dataset.json + imagesTr/labelsTr)"]),
    "missing": (lambda root: None, ["does not exist", "nnU-Net raw (DatasetXXX_Name", "paired (images/ + labels/)"]),
    "file": (lambda root: touch(root), ["is a file"]),
    "unknown": (_unknown, ["follows no known dataset layout", "scan.nii.gz", "hint:"]),
    "nested": (_nested, ["follows no known dataset layout", "did you mean the subfolder 'Task03_Liver'"]),
    "duplicate_ids": (_duplicate_ids, ["case id 'a' is used twice", "a.nii.gz and a.nrrd"]),
    "json_no_keys": (_json_without_layout_keys, ["neither 'channel_names' (nnU-Net) nor 'training' (MSD)"]),
    "bad_json": (_bad_json, ["dataset.json is not valid JSON", "line 1"]),
    "msd_no_labels": (_msd_without_labels, ["dataset.json lacks the required key 'labels'"]),
    "nnunet_no_json": (_nnunet_name_without_json, ["looks like an nnU-Net raw folder but has no dataset.json"]),
    "missing_channel": (_nnunet_missing_channel, ["prostate_01 lacks prostate_01_0001.nii.gz", "channel_names"]),
    "no_suffix": (_nnunet_without_suffix, ["lack the channel suffix _XXXX: stray.nii.gz"]),
    "regions": (
        lambda root: make_nnunet(root, labels={"background": 0, "whole": [1, 2], "core": 2}),
        ["label 'whole' is the region [1, 2]: region-based labels not supported"],
    ),
    "regions_order": (
        lambda root: make_nnunet(root, regions_class_order=[1, 2]),
        ["region-based labels not supported"],
    ),
    "label_gap": (
        lambda root: make_nnunet(root, labels={"background": 0, "a": 1, "b": 3}),
        ["label values [0, 1, 3] are not consecutive from 0"],
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_bad_folders_raise_data_error(tmp_path: Path, kind: str) -> None:
    build, fragments = BAD_FOLDERS[kind]
    root = tmp_path / ("Dataset001_Bad" if kind == "nnunet_no_json" else "data")
    build(root)
    with pytest.raises(DataError) as info:
        load_manifest(root)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
