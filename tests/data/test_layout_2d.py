"""The 2D paired layout (images/ + masks/ or labels/ of PNG, TIFF, JPEG, DICOM files) and its verification."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medseg.core.errors import DataError
from medseg.data import detect_layout, load_manifest, strip_image_extension, verify_dataset
from medseg.data.verify import HINT_255
from medseg.io import load_image, save_mask

SHAPE = (10, 13)  # rows, columns
YAML = "name: busi\nlabels: {0: background, 1: lesion}\nmodality: ultrasound\n"


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*SHAPE, 3)).astype(np.uint8)


def mask(value: int = 1) -> np.ndarray:
    data = np.zeros(SHAPE, np.uint8)
    data[2:7, 3:9] = value
    return data


def write_png(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path)
    return path


def make_2d(root: Path, label_folder: str = "masks", ids: tuple[str, ...] = ("case_b", "case_a")) -> Path:
    for i, cid in enumerate(ids):
        write_png(root / "images" / f"{cid}.png", rgb(i))
        write_png(root / label_folder / f"{cid}.png", mask())
    write_png(root / "images" / "unlabelled.png", rgb(9))
    (root / "dataset.yaml").write_text(YAML)
    return root


def kinds(problems: list) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in problems:
        out.setdefault(p.case_id, set()).add(p.kind)
    return out


def test_strip_2d_extensions() -> None:
    assert strip_image_extension("a.png") == "a" and strip_image_extension("ISIC_001.JPG") == "ISIC_001"
    assert strip_image_extension("x.tiff") == "x" and strip_image_extension("x.tif") == "x"
    assert strip_image_extension("ct.dcm") == "ct" and strip_image_extension("y.bmp") == "y"


@pytest.mark.parametrize("label_folder", ["masks", "labels"])
def test_paired_2d_dataset_loads_and_verifies_clean(tmp_path: Path, label_folder: str) -> None:
    root = make_2d(tmp_path / "busi", label_folder)
    assert detect_layout(root) == "paired"
    m = load_manifest(root)
    assert [c.case_id for c in m.cases] == ["case_a", "case_b"] and [c.case_id for c in m.test_cases] == ["unlabelled"]
    assert m.cases[0].label == root / label_folder / "case_a.png"
    assert (m.name, m.file_ending, m.modality) == ("busi", ".png", "US")
    assert m.channel_names == ("red", "green", "blue") and m.label_names == ("background", "lesion")
    assert verify_dataset(m) == []
    image = load_image(m.cases[0].images[0])
    assert tuple(image.shape) == (3, SHAPE[1], SHAPE[0], 1)


def test_grey_16bit_tiff_images_with_png_labels(tmp_path: Path) -> None:
    root = tmp_path / "grey"
    (root / "images").mkdir(parents=True)
    for i, cid in enumerate(("a", "b")):
        grey = np.random.default_rng(i).integers(0, 65536, size=SHAPE).astype(np.uint16)
        Image.fromarray(grey).save(root / "images" / f"{cid}.tif")
        write_png(root / "labels" / f"{cid}.png", mask())
    m = load_manifest(root)
    assert m.file_ending == ".tif" and m.channel_names == ("channel_0",) and m.label_names == ()
    assert verify_dataset(m) == []


def test_both_label_folders_is_an_error(tmp_path: Path) -> None:
    root = make_2d(tmp_path / "both")
    write_png(root / "labels" / "case_a.png", mask())
    with pytest.raises(DataError, match=r"both labels/ and masks/.*expected one folder of label files"):
        load_manifest(root)


def test_mask_with_255_foreground_gets_the_hint(tmp_path: Path) -> None:
    root = make_2d(tmp_path / "isic")
    write_png(root / "masks" / "case_b.png", mask(255))
    problems = verify_dataset(load_manifest(root))
    assert kinds(problems) == {"case_b": {"label_values"}}
    assert "values 255 outside the declared labels 0=background, 1=lesion" in problems[0].message
    assert HINT_255 in problems[0].message
    assert HINT_255 == "the mask stores 255 for foreground; save label values (0, 1, ...) instead"


def test_colour_shape_jpeg_and_pixel_size_faults(tmp_path: Path) -> None:
    root = make_2d(tmp_path / "faults", ids=("rgb_mask", "wrong_shape", "jpeg_mask", "dpi"))
    grey_as_rgb = np.repeat(mask()[..., None], 3, axis=-1)
    write_png(root / "masks" / "rgb_mask.png", np.dstack([grey_as_rgb, np.full(SHAPE, 255, np.uint8)]))
    write_png(root / "masks" / "wrong_shape.png", mask()[:, :-1])
    (root / "masks" / "jpeg_mask.png").unlink()
    Image.fromarray(mask(255)).save(root / "masks" / "jpeg_mask.jpg", quality=50)
    Image.fromarray(mask()).save(root / "masks" / "dpi.png", dpi=(254, 254))
    problems = verify_dataset(load_manifest(root))
    assert kinds(problems) == {
        "rgb_mask": {"label_channels"},
        "wrong_shape": {"shape_mismatch"},
        "jpeg_mask": {"label_values"},
        "dpi": {"affine_mismatch"},
    }
    by_case = {p.case_id: p.message for p in problems}
    assert "colour (RGB/RGBA) image with 3 channels" in by_case["rgb_mask"]
    assert "colour channels are identical" in by_case["rgb_mask"]
    assert "JPEG compression alters mask values" in by_case["jpeg_mask"]
    assert "declare different pixel sizes" in by_case["dpi"]


def test_dicom_images_with_png_masks(tmp_path: Path) -> None:
    root = tmp_path / "ct2d"
    (root / "images").mkdir(parents=True)
    for cid in ("ct_1", "ct_2"):
        image_path = root / "images" / f"{cid}.dcm"
        shutil.copy(get_testdata_file("CT_small.dcm"), image_path)
        image = load_image(image_path)
        save_mask(image[0] > 0, image, root / "masks" / f"{cid}.png")
    (root / "dataset.yaml").write_text("labels: {0: background, 1: body}\nmodality: CT\n")
    m = load_manifest(root)
    assert (m.file_ending, m.channel_names, m.modality) == (".dcm", ("CT",), "CT")
    assert verify_dataset(m) == []
