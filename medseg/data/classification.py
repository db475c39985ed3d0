"""Image classification datasets: class folders, a CSV of (image, label) rows, or a MedMNIST ``.npz`` file.

Three layouts are understood (:func:`detect_classification_layout`, tried in this order):

* **MedMNIST npz** (a ``.npz`` file, or a folder holding exactly one): the arrays ``train_images`` /
  ``train_labels`` and optionally ``val_*`` and ``test_*``, as the MedMNIST v2/v3 files store them. Images are
  ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB) ``uint8``; labels ``(N, 1)`` or ``(N,)`` integers. Nothing is
  downloaded: the file must already be on disk. Multi-label files (ChestMNIST, labels ``(N, 14)``) are refused.
* **CSV** (a ``.csv`` file, or a folder holding exactly one whose header has ``image`` and ``label``): one row per
  image, ``image`` a path relative to the CSV's folder, ``label`` an integer class index, and an optional ``split``
  column (``train``, ``val``, ``test``; rows without one are training rows).
* **class folders** (as torchvision's ``ImageFolder``): ``train/<class>/*.png|jpg|jpeg|tif|tiff|bmp``, optional
  ``val/<class>/`` and ``test/<class>/``. Class names are the sorted folder names of ``train/``; class ``k`` is the
  ``k``-th of them.

Class names of the npz and CSV layouts come from an optional ``dataset.yaml`` (or ``dataset.json``) next to the
data, ``labels: {0: benign, 1: malignant}``; otherwise they are ``class_0``, ``class_1``, ... .

Images are read through :func:`medseg.io.load_image` and handed to the network as ``(3, H, W)`` float tensors of
8-bit values in ``[0, 255]`` (rows first, as the file stores them; grey images replicated to three channels), which
the ``rgb_mean05_std05`` preset scales to ``[-1, 1]``. A layout that cannot be understood raises
:class:`~medseg.core.errors.DataError` in :func:`load_classification_dataset`; unreadable or non-8-bit images are
reported, all at once, by :func:`verify_classification`.

The transforms are MONAI's (``RandFlipd``, ``RandRotated``, ``ScaleIntensityRanged``) plus two MONAI lacks:
:class:`RandResizedCropd`, torchvision's ``RandomResizedCrop`` rule (area share and aspect ratio drawn at random,
log-uniform ratio, ten tries, then a central crop) as a MONAI randomisable transform, and :class:`ResizeImaged`, an
anti-aliased bilinear resize that leaves the image border alone (see :func:`resize_image`).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandRotated,
)

from medseg.core.errors import DataError
from medseg.core.keys import IMAGE, LABEL
from medseg.data.manifest import parse_label_names, read_meta_file
from medseg.data.verify import DATASET_CASE_ID, Problem
from medseg.io import load_image
from medseg.transforms.presets import intensity

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_IMAGE_SUFFIXES",
    "CLASSIFICATION_LAYOUTS",
    "ClassSample",
    "ClassificationDataset",
    "LoadClassImaged",
    "RandResizedCropd",
    "ResizeImaged",
    "classification_eval_transforms",
    "classification_train_transforms",
    "detect_classification_layout",
    "image_to_chw",
    "load_classification_dataset",
    "read_sample",
    "require_valid_classification",
    "resize_image",
    "split_samples",
    "verify_classification",
]

ClassLayoutName = Literal["medmnist_npz", "csv", "class_folders"]
CLASSIFICATION_LAYOUTS: tuple[str, ...] = ("medmnist_npz", "csv", "class_folders")
CLASS_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")
EXPECTED_CLASSIFICATION = (
    "a classification dataset: train/<class>/*.png|jpg|tif (optional val/, test/), a CSV with columns image,label "
    "(paths relative to the CSV), or a MedMNIST .npz (train_images, train_labels, val_*, test_*)"
)
#: The MedViTV2 recipe's augmentation (docs/models/medvit2.md), AugMix replaced by a small rotation.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
FLIP_PROB, ROTATE_DEG, ROTATE_PROB = 0.4, 10.0, 0.3


@dataclass(frozen=True)
class ClassSample:
    """One labelled image of a classification dataset.

    Attributes:
        case_id: unique id (``train/benign/img_01``, ``test_00017``).
        label: class index ``0 .. K-1``.
        path: the image file (class folders, CSV), or ``None``.
        array: the image ``(H, W)`` or ``(H, W, 3)`` uint8 (npz), or ``None``.
    """

    case_id: str
    label: int
    path: Path | None = None
    array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """``{"image": path or array, "label": int, "case_id": str}`` for the transforms."""
        return {IMAGE: self.path if self.path is not None else self.array, LABEL: self.label, "case_id": self.case_id}


@dataclass(frozen=True)
class ClassificationDataset:
    """A classification dataset as read from disk.

    Attributes:
        root: the file or folder given.
        layout: one of :data:`CLASSIFICATION_LAYOUTS`.
        class_names: names of classes ``0 .. K-1``.
        train, val, test: the samples of each split (``val`` / ``test`` may be empty).
    """

    root: Path
    layout: ClassLayoutName
    class_names: tuple[str, ...]
    train: tuple[ClassSample, ...]
    val: tuple[ClassSample, ...] = ()
    test: tuple[ClassSample, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> tuple[ClassSample, ...]:
        """The samples of split ``name`` (``train``, ``val`` or ``test``)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def evaluation_split(self) -> str:
        """The split ``medseg evaluate`` scores: ``test`` if present, else ``val``, else ``train``."""
        return next(s for s in ("test", "val", "train") if self.split(s))

    def describe(self) -> str:
        counts = ", ".join(f"{len(self.split(s))} {s}" for s in SPLITS)
        return f"{self.root}: {self.layout} classification layout, {counts}, classes {list(self.class_names)}"


# --------------------------------------------------------------------------------------------------- detection


def _single(folder: Path, suffix: str) -> Path | None:
    found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
    return found[0] if len(found) == 1 else None


def _csv_has_columns(path: Path) -> bool:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError):
        return False
    return {"image", "label"} <= {h.strip() for h in header}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(CLASS_IMAGE_SUFFIXES))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_classification_layout(root: str | Path) -> ClassLayoutName | None:
    """The classification layout of ``root`` (a file or folder), or ``None`` when it follows none.

    Cheap: file names only, plus the first line of a CSV.
    """
    root = Path(root)
    if root.is_file():
        suffix = root.suffix.lower()
        return "medmnist_npz" if suffix == ".npz" else "csv" if suffix == ".csv" else None
    if not root.is_dir():
        return None
    train = root / "train"
    if train.is_dir() and any(_image_files(d) for d in _class_dirs(train)):
        return "class_folders"
    if _single(root, ".npz") is not None and not (root / "images").is_dir():
        return "medmnist_npz"
    single_csv = _single(root, ".csv")
    if single_csv is not None and _csv_has_columns(single_csv):
        return "csv"
    return None


def load_classification_dataset(root: str | Path) -> ClassificationDataset:
    """Detect the layout of ``root`` and read it (paths and labels; npz arrays are loaded).

    Raises:
        DataError: no classification layout; an npz with mismatched image/label counts, missing keys or multi-label
            labels; fewer than two classes in the training split; labels that are not integers; a CSV without
            ``image`` / ``label`` columns; a class folder of ``val/`` or ``test/`` unknown to ``train/``.

    Examples::

        >>> ds = load_classification_dataset("pathmnist_224.npz")
        >>> ds.layout, ds.num_classes, len(ds.train)
        ('medmnist_npz', 9, 89996)
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset {root} does not exist", expected=EXPECTED_CLASSIFICATION, path=root)
    layout = detect_classification_layout(root)
    if layout is None:
        raise DataError(
            f"{root} is not a classification dataset",
            expected=EXPECTED_CLASSIFICATION,
            hint="put the images of class <name> in train/<name>/, or list them in a CSV",
            path=root,
        )
    loader = {"medmnist_npz": _load_npz, "csv": _load_csv, "class_folders": _load_class_folders}[layout]
    dataset = loader(root)
    _check_classes(dataset)
    logger.info("%s", dataset.describe())
    return dataset


def _check_classes(ds: ClassificationDataset) -> None:
    present = sorted({s.label for s in ds.train})
    if len(present) < 2:
        which = ds.class_names[present[0]] if present else "none"
        raise DataError(
            f"the training split of {ds.root} holds {len(present)} class ({which}); a classifier needs two or more",
            expected="images of at least two classes",
            hint="add a folder (or rows) for every class, e.g. train/benign/ and train/malignant/",
            path=ds.root,
        )
    for name in SPLITS:
        bad = sorted({s.label for s in ds.split(name)} - set(range(ds.num_classes)))
        if bad:
            raise DataError(
                f"{name} labels {bad[:5]} of {ds.root} are outside the {ds.num_classes} declared classes",
                expected=f"labels 0..{ds.num_classes - 1}",
                path=ds.root,
            )


def _class_names(meta_root: Path, num: int, source: Path) -> tuple[str, ...]:
    meta, meta_path = read_meta_file(meta_root)
    if "labels" not in meta:
        return tuple(f"class_{i}" for i in range(num))
    names = parse_label_names(meta["labels"], meta_path or source)
    if len(names) < num:
        raise DataError(
            f"{meta_path} names {len(names)} classes but the labels go up to {num - 1}",
            expected=f"a name for every class 0..{num - 1}",
            path=meta_path,
        )
    return names


def _integer_labels(raw: np.ndarray, where: str, path: Path) -> np.ndarray:
    labels = np.asarray(raw)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{where} of {path} has shape {labels.shape}: multi-label data is not supported",
            expected="labels (N,) or (N, 1): one class index per image",
            path=path,
        )
    if labels.dtype.kind not in "iu":
        finite = labels.dtype.kind == "f" and bool(np.all(np.isfinite(labels)))
        if not (finite and np.array_equal(labels, np.round(labels))):
            shown = ", ".join(str(v) for v in labels[:3].tolist())
            raise DataError(
                f"{where} of {path} are not integers (dtype {labels.dtype}: {shown}, ...)",
                expected="integer class indices 0..K-1",
                hint="store the class index of every image, not one-hot rows, names or probabilities",
                path=path,
            )
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where} of {path} hold negative values", expected="class indices 0..K-1", path=path)
    return labels


def _load_npz(root: Path) -> ClassificationDataset:
    path = root if root.is_file() else _single(root, ".npz")
    if path is None:
        raise DataError(f"{root} holds no single .npz file", expected=EXPECTED_CLASSIFICATION, path=root)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}", expected="a MedMNIST .npz file", path=path) from None
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise DataError(
            f"{path} has keys {sorted(arrays)[:8]}",
            expected="train_images and train_labels (and optionally val_*, test_*)",
            hint="use the .npz files MedMNIST distributes",
            path=path,
        )
    splits: dict[str, tuple[ClassSample, ...]] = {}
    for name in SPLITS:
        images, raw = arrays.get(f"{name}_images"), arrays.get(f"{name}_labels")
        if images is None and raw is None:
            splits[name] = ()
            continue
        if images is None or raw is None:
            missing = f"{name}_images" if images is None else f"{name}_labels"
            raise DataError(f"{path} has no {missing}", expected=f"{name}_images with {name}_labels", path=path)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise DataError(
                f"{name}_images of {path} has shape {images.shape}",
                expected="(N, H, W) grey or (N, H, W, 3) RGB images",
                path=path,
            )
        if images.dtype != np.uint8:
            raise DataError(f"{name}_images of {path} is {images.dtype}", expected="uint8 pixels", path=path)
        labels = _integer_labels(raw, f"{name}_labels", path)
        if len(labels) != len(images):
            raise DataError(
                f"{path}: {name}_images holds {len(images)} images but {name}_labels {len(labels)} labels",
                expected="one label per image",
                hint="the file is truncated or its arrays come from different datasets",
                path=path,
            )
        splits[name] = tuple(
            ClassSample(f"{name}_{i:05d}", int(lab), array=images[i]) for i, lab in enumerate(labels.tolist())
        )
    num = 1 + max((s.label for part in splits.values() for s in part), default=0)
    return ClassificationDataset(
        root, "medmnist_npz", _class_names(path.parent, num, path), splits["train"], splits["val"], splits["test"]
    )


def _load_csv(root: Path) -> ClassificationDataset:
    path = root if root.is_file() else _single(root, ".csv")
    if path is None:
        raise DataError(f"{root} holds no single .csv file", expected=EXPECTED_CLASSIFICATION, path=root)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"cannot read {path}: {err}", expected="a CSV file with columns image,label", path=path
        ) from None
    columns = {c.strip() for c in (rows[0].keys() if rows else [])}
    if not rows or not {"image", "label"} <= columns:
        raise DataError(
            f"{path} has columns {sorted(columns)} and {len(rows)} rows",
            expected="a header with image,label (optional split) and one row per image",
            path=path,
        )
    splits: dict[str, list[ClassSample]] = {name: [] for name in SPLITS}
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        try:
            label = int(row["label"])
        except ValueError:
            raise DataError(
                f"{path} line {line}: label {row['label']!r} is not an integer",
                expected="integer class indices 0..K-1 in the label column",
                hint="map class names to indices and name them in dataset.yaml (labels: {0: name, ...})",
                path=path,
            ) from None
        if label < 0:
            raise DataError(f"{path} line {line}: label {label} is negative", expected="0..K-1", path=path)
        split = row.get("split") or "train"
        if split not in SPLITS:
            raise DataError(f"{path} line {line}: split {split!r}", expected=f"one of {SPLITS} or empty", path=path)
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        case_id = str(Path(row["image"]).with_suffix("")) or f"row_{line}"
        splits[split].append(ClassSample(case_id, label, path=image))
    num = 1 + max(s.label for part in splits.values() for s in part)
    names = _class_names(path.parent, num, path)
    return ClassificationDataset(
        root, "csv", names, tuple(splits["train"]), tuple(splits["val"]), tuple(splits["test"])
    )


def _load_class_folders(root: Path) -> ClassificationDataset:
    train_dirs = [d for d in _class_dirs(root / "train") if _image_files(d)]
    names = tuple(d.name for d in train_dirs)
    loose = _image_files(root / "train")
    if loose:
        logger.warning("%s: %d image(s) directly in train/ (not in a class folder) are ignored", root, len(loose))
    splits: dict[str, tuple[ClassSample, ...]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            splits[split] = ()
            continue
        samples = []
        for d in _class_dirs(folder):
            files = _image_files(d)
            if not files:
                continue
            if d.name not in names:
                raise DataError(
                    f"{folder} has a class folder {d.name!r} that train/ does not have",
                    expected=f"class folders among {list(names)}",
                    hint="every class of val/ and test/ needs training images in train/<class>/",
                    path=d,
                )
            label = names.index(d.name)
            samples += [ClassSample(f"{split}/{d.name}/{f.stem}", label, path=f) for f in files]
        splits[split] = tuple(samples)
    return ClassificationDataset(root, "class_folders", names, splits["train"], splits["val"], splits["test"])


# --------------------------------------------------------------------------------------------------- images


def image_to_chw(image: Any, source: str = "image") -> torch.Tensor:
    """A loaded 2D image as a ``(3, H, W)`` float tensor of 8-bit values (rows first).

    Args:
        image: a ``MetaTensor`` ``(C, X, Y, 1)`` or ``(C, X, Y)`` from :func:`medseg.io.load_image` (X = column),
            or an array ``(H, W)`` / ``(H, W, 3)`` (rows first, as MedMNIST stores them); C is 1 (grey,
            replicated) or 3.
        source: name for messages.

    Raises:
        DataError: not a 2D grey or RGB image, or values outside ``[0, 255]`` (16-bit or float images).
    """
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: npz arrays may be read-only
        chw = t[None] if t.ndim == 2 else t.permute(2, 0, 1) if t.ndim == 3 else t
    else:
        t = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
        if t.ndim == 4 and t.shape[-1] == 1:
            t = t[..., 0]
        if t.ndim != 3:
            raise DataError(
                f"{source} has shape {tuple(t.shape)}: a volume, not a 2D image",
                expected="a 2D image (PNG, JPEG, TIFF, BMP or one DICOM frame)",
                hint="classify a 2D image, or one slice of the volume saved as PNG",
            )
        chw = t.permute(0, 2, 1)  # (C, X, Y) -> (C, rows, columns)
    if chw.ndim != 3 or chw.shape[0] not in (1, 3):
        raise DataError(f"{source} has shape {tuple(chw.shape)}", expected="a grey or RGB 2D image")
    if chw.shape[0] == 1:
        chw = chw.expand(3, -1, -1)
    low, high = float(chw.min()), float(chw.max())
    if low < 0 or high > 255:
        raise DataError(
            f"{source} holds values {low:g}..{high:g}",
            expected="8-bit pixels 0..255 (the rgb_mean05_std05 preset)",
            hint="convert 16-bit or float images to 8-bit PNG first",
        )
    return chw.contiguous()


def read_sample(sample: ClassSample) -> torch.Tensor:
    """The image of ``sample`` as ``(3, H, W)`` (see :func:`image_to_chw`)."""
    if sample.array is not None:
        return image_to_chw(sample.array, sample.case_id)
    if sample.path is None:
        raise DataError(f"sample {sample.case_id} has neither a path nor an array")
    return image_to_chw(load_image(sample.path, allow_external_data=True), sample.path.name)


class LoadClassImaged(MapTransform):
    """Dictionary transform: an image path or ``(H, W[, 3])`` array under ``keys`` to ``(3, H, W)`` float."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, np.ndarray):
                d[key] = image_to_chw(value, str(d.get("case_id", "image")))
            elif isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[0] == 3:
                d[key] = value.float()
            else:
                d[key] = image_to_chw(load_image(value, allow_external_data=True), Path(str(value)).name)
        return d


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(C, H, W)`` resized to ``size`` ``(H, W)``: bilinear with anti-aliasing when shrinking, as torchvision's
    ``Resize`` does (``torch.nn.functional.interpolate(..., antialias=True)``). MONAI's ``Resize(anti_aliasing=True)``
    pre-smooths with a zero-padded Gaussian, which darkens the image border, hence this function."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == size:
        return image.float()
    x = torch.nn.functional.interpolate(
        image.float()[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return x[0]


class ResizeImaged(MapTransform):
    """Dictionary form of :func:`resize_image`.

    Args:
        keys: image keys ``(C, H, W)``.
        size: output ``(H, W)``.
    """

    def __init__(self, keys: Any, size: Sequence[int]) -> None:
        super().__init__(keys)
        self.size = tuple(int(s) for s in size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = resize_image(torch.as_tensor(d[key]), self.size)
        return d


class RandResizedCropd(RandomizableTransform, MapTransform):
    """torchvision's ``RandomResizedCrop`` for ``(C, H, W)`` images in MONAI form (MONAI has no equivalent).

    Draws a crop whose area is a share ``scale`` of the image and whose aspect ratio (width / height) lies in
    ``ratio`` (log-uniform), retrying ten times before falling back to the largest central crop within ``ratio``,
    then resizes it to ``size`` (:func:`resize_image`). Seeded through ``set_random_state`` like every MONAI
    random transform.

    Args:
        keys: image keys.
        size: output ``(H, W)``.
        scale: range of the crop's share of the image area.
        ratio: range of the crop's aspect ratio.
    """

    def __init__(
        self,
        keys: Any,
        size: Sequence[int],
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.size = tuple(int(s) for s in size)
        self.scale, self.ratio = scale, ratio
        self._box = (0, 0, 1, 1)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw ``(top, left, h, w)`` for an image of ``height`` x ``width``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            top, left, h, w = self.box(int(image.shape[-2]), int(image.shape[-1]))
            d[key] = resize_image(image[..., top : top + h, left : left + w], self.size)
        return d


def classification_eval_transforms(size: Sequence[int], preset: str) -> Compose:
    """Load, resize to ``size`` ``(H, W)`` (:func:`resize_image`) and normalise with ``preset``: what
    validation, evaluation and prediction apply (the recipe's test-time ``Resize``)."""
    size = tuple(int(s) for s in size)
    return Compose(
        [
            LoadClassImaged(IMAGE),
            ResizeImaged(IMAGE, size),
            *intensity(preset),
            EnsureTyped(IMAGE, track_meta=False),
        ]
    )


def classification_train_transforms(size: Sequence[int], preset: str) -> Compose:
    """Load, then the MedViTV2 recipe's augmentation with MONAI transforms: random resized crop to ``size``
    (area 8-100 %, aspect 3/4-4/3), horizontal flip (p 0.4), a small rotation (up to 10 degrees, p 0.3; in place
    of AugMix), then ``preset``."""
    size = tuple(int(s) for s in size)
    return Compose(
        [
            LoadClassImaged(IMAGE),
            RandResizedCropd(IMAGE, size),
            RandFlipd(IMAGE, prob=FLIP_PROB, spatial_axis=1),
            RandRotated(IMAGE, range_x=math.radians(ROTATE_DEG), prob=ROTATE_PROB, keep_size=True),
            *intensity(preset),
            EnsureTyped(IMAGE, track_meta=False),
        ]
    )


# --------------------------------------------------------------------------------------------------- splits


def split_samples(
    samples: Sequence[ClassSample], val_fraction: float, seed: int
) -> tuple[tuple[ClassSample, ...], tuple[ClassSample, ...]]:
    """Stratified, seeded split of ``samples`` into (train, val): ``val_fraction`` of every class (rounded, at least
    one image of a class with two or more, none of a class with one)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[ClassSample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    train: list[ClassSample] = []
    val: list[ClassSample] = []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_val = 0 if len(items) < 2 or val_fraction <= 0 else max(1, round(val_fraction * len(items)))
        val += [items[i] for i in order[:n_val]]
        train += [items[i] for i in order[n_val:]]
    return tuple(train), tuple(val)


# --------------------------------------------------------------------------------------------------- verify


def verify_classification(dataset: ClassificationDataset) -> list[Problem]:
    """Read every image of every split and return all problems (missing, unreadable, not 2D 8-bit grey/RGB),
    plus dataset-wide ones (a class without training images)."""
    problems: list[Problem] = []
    counts = Counter(s.label for s in dataset.train)
    for k, name in enumerate(dataset.class_names):
        if not counts[k]:
            problems.append(
                Problem(DATASET_CASE_ID, dataset.root, "class_count", f"class {k} ({name}) has no training image")
            )
    for split in SPLITS:
        for sample in dataset.split(split):
            if sample.path is not None and not sample.path.is_file():
                problems.append(Problem(sample.case_id, sample.path, "missing_image", "image file not found"))
                continue
            try:
                read_sample(sample)
            except DataError as err:
                problems.append(Problem(sample.case_id, sample.path, "unreadable", err.message))
            except Exception as err:  # noqa: BLE001 - a verifier reports any reader failure and goes on
                problems.append(Problem(sample.case_id, sample.path, "unreadable", f"{type(err).__name__}: {err}"))
    logger.info("verified %s: %d problem(s)", dataset.root, len(problems))
    return problems


def require_valid_classification(dataset: ClassificationDataset) -> None:
    """Verify ``dataset``; problems are logged and raise one ``DataError`` naming the first.

    Raises:
        DataError: at least one problem (see :func:`verify_classification`).
    """
    problems = verify_classification(dataset)
    if problems:
        for p in problems:
            logger.error("%s", p)
        raise DataError(
            f"{len(problems)} problem(s) in dataset {dataset.root}, first: {problems[0]}",
            hint=f"run `medseg verify-data {dataset.root}` for the full list",
            path=dataset.root,
        )
