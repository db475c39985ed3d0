"""Classification dataset layouts: class folders, CSV, MedMNIST npz; bad input refused with DataError and a hint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.core.errors import DataError
from medseg.data.classification import (
    RandResizedCropd,
    classification_eval_transforms,
    detect_classification_layout,
    image_to_chw,
    load_classification_dataset,
    read_sample,
    split_samples,
    verify_classification,
)
from medseg.data.layouts import detect_layout

torch.set_num_threads(1)


def _png(path: Path, value: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def _class_folders(root: Path, classes: tuple[str, ...] = ("benign", "malignant"), n: int = 3) -> Path:
    for k, name in enumerate(classes):
        for i in range(n):
            _png(root / "train" / name / f"img_{i}.png", 10 * k + i)
        _png(root / "test" / name / "t0.png", 100 + k)
    return root


def test_class_folders_layout(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "ds")
    _png(root / "train" / "malignant" / "grey.png", 7, mode="L")
    (root / "train" / "benign" / "notes.txt").write_text("not an image")
    assert detect_classification_layout(root) == "class_folders"
    ds = load_classification_dataset(root)
    assert ds.class_names == ("benign", "malignant") and ds.layout == "class_folders"
    assert len(ds.train) == 7 and len(ds.test) == 2 and not ds.val
    assert {s.label for s in ds.train if "malignant" in s.case_id} == {1}
    assert ds.evaluation_split() == "test"
    image = read_sample(next(s for s in ds.train if s.case_id.endswith("grey")))
    assert image.shape == (3, 30, 40)  # (3, H, W): rows first, grey replicated
    assert torch.equal(image[0], image[2])
    assert verify_classification(ds) == []
    with pytest.raises(DataError, match="follows no known dataset layout"):
        detect_layout(root)  # the segmentation layouts do not claim it


def test_pixels_keep_rows_first(tmp_path: Path) -> None:
    array = np.zeros((20, 50, 3), np.uint8)
    array[2, 45] = (255, 0, 0)
    Image.fromarray(array).save(tmp_path / "a.png")
    from medseg.io import load_image

    chw = image_to_chw(load_image(tmp_path / "a.png"))
    assert chw.shape == (3, 20, 50) and chw[0, 2, 45] == 255 and chw[1, 2, 45] == 0
    assert torch.equal(image_to_chw(array), chw)


def test_one_class_only_is_refused(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "ds", classes=("benign",))
    with pytest.raises(DataError, match="holds 1 class .*benign.*at least two classes.*hint: add a folder"):
        load_classification_dataset(root)


def test_unknown_class_in_test_is_refused(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "ds")
    _png(root / "test" / "other" / "x.png", 3)
    with pytest.raises(DataError, match="class folder 'other' that train/ does not have"):
        load_classification_dataset(root)


def test_unreadable_and_16bit_images_are_reported(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "ds")
    (root / "train" / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    deep = np.full((8, 8), 4000, np.uint16)
    Image.fromarray(deep).save(root / "train" / "malignant" / "deep.png")
    problems = verify_classification(load_classification_dataset(root))
    by_id = {p.case_id: p for p in problems}
    assert set(by_id) == {"train/benign/broken", "train/malignant/deep"}
    assert all(p.kind == "unreadable" for p in problems)
    assert "8-bit" in by_id["train/malignant/deep"].message


def test_csv_layout(tmp_path: Path) -> None:
    root = tmp_path / "csvds"
    for i in range(4):
        _png(root / "img" / f"{i}.png", i)
    (root / "labels.csv").write_text(
        "image,label,split\nimg/0.png,0,\nimg/1.png,1,train\nimg/2.png,1,val\nimg/3.png,0,test\n"
    )
    (root / "dataset.yaml").write_text("labels: {0: normal, 1: tumour}\n")
    assert detect_classification_layout(root) == "csv"
    assert detect_classification_layout(root / "labels.csv") == "csv"
    ds = load_classification_dataset(root)
    assert ds.class_names == ("normal", "tumour")
    assert [s.label for s in ds.train] == [0, 1] and len(ds.val) == 1 and len(ds.test) == 1
    assert ds.train[0].path == root / "img" / "0.png"
    (root / "labels.csv").write_text("image,label\nimg/0.png,0\nimg/1.png,1\nimg/9.png,1\n")
    problems = verify_classification(load_classification_dataset(root))
    assert [(p.case_id, p.kind) for p in problems] == [("img/9", "missing_image")]


def test_csv_labels_must_be_integers(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("image,label\na.png,0\nb.png,cat\n")
    with pytest.raises(DataError, match=r"line 3: label 'cat' is not an integer.*hint: map class names"):
        load_classification_dataset(csv)
    csv.write_text("path,class\na.png,0\n")
    with pytest.raises(DataError, match="columns"):
        load_classification_dataset(csv)


def _npz(path: Path, n_train: int = 6, n_labels: int | None = None, rgb: bool = True, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    shape = (n_train, 28, 28, 3) if rgb else (n_train, 28, 28)
    arrays = {
        "train_images": rng.integers(0, 255, shape, dtype=np.uint8),
        "train_labels": (np.arange(n_labels or n_train) % 3).reshape(-1, 1).astype(np.uint8),
        "test_images": rng.integers(0, 255, (2, *shape[1:]), dtype=np.uint8),
        "test_labels": np.array([[0], [2]], np.uint8),
        **extra,
    }
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_npz_layout(tmp_path: Path) -> None:
    path = _npz(tmp_path / "bloodmnist.npz")
    assert detect_classification_layout(path) == "medmnist_npz"
    assert detect_classification_layout(tmp_path) == "medmnist_npz"
    ds = load_classification_dataset(path)
    assert ds.class_names == ("class_0", "class_1", "class_2") and len(ds.train) == 6 and len(ds.test) == 2
    assert [s.label for s in ds.train] == [0, 1, 2, 0, 1, 2]
    assert read_sample(ds.train[1]).shape == (3, 28, 28)
    (tmp_path / "g").mkdir()
    grey = load_classification_dataset(_npz(tmp_path / "g" / "organ.npz", rgb=False))
    assert read_sample(grey.train[0]).shape == (3, 28, 28)


def test_npz_with_mismatched_counts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_images holds 6 images but train_labels 5 labels.*hint"):
        load_classification_dataset(_npz(tmp_path / "bad.npz", n_labels=5))


def test_npz_labels_must_be_integer_class_indices(tmp_path: Path) -> None:
    floats = np.array([[0.5], [1.0], [0.0], [1.0], [0.0], [2.0]])
    with pytest.raises(DataError, match="train_labels .* are not integers"):
        load_classification_dataset(_npz(tmp_path / "f.npz", train_labels=floats))
    multi = np.zeros((6, 14), np.uint8)
    with pytest.raises(DataError, match="multi-label data is not supported"):
        load_classification_dataset(_npz(tmp_path / "chest.npz", train_labels=multi))
    with pytest.raises(DataError, match="train_images and train_labels"):
        np.savez(tmp_path / "empty.npz", x=np.zeros(3))
        load_classification_dataset(tmp_path / "empty.npz")


def test_not_a_classification_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    assert detect_classification_layout(tmp_path) is None
    with pytest.raises(DataError, match="is not a classification dataset.*class folders|train/<class>"):
        load_classification_dataset(tmp_path)


def test_stratified_split_is_seeded(tmp_path: Path) -> None:
    ds = load_classification_dataset(_class_folders(tmp_path / "ds", n=5))
    train, val = split_samples(ds.train, 0.2, seed=3)
    assert len(val) == 2 and {s.label for s in val} == {0, 1} and len(train) == 8
    assert split_samples(ds.train, 0.2, seed=3) == (train, val)
    assert not set(train) & set(val)


def test_transforms_give_the_network_input() -> None:
    chw = torch.full((3, 60, 90), 255.0)
    chw[:, :, :45] = 0
    out = classification_eval_transforms((32, 32), "rgb_mean05_std05")({"image": chw})["image"]
    assert out.shape == (3, 32, 32) and float(out.min()) == -1.0 and float(out.max()) == 1.0
    crop = RandResizedCropd("image", (16, 16))
    crop.set_random_state(0)
    a = crop({"image": chw})["image"]
    crop.set_random_state(0)
    assert a.shape == (3, 16, 16) and torch.equal(a, crop({"image": chw})["image"])
    for _ in range(50):
        top, left, h, w = crop.box(60, 90)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or (h, w) == (60, 80)
