"""The public ultrasound dataset layouts, BUSI and CAMUS, read as 2D paired folders.

* **BUSI** (breast ultrasound images): ``benign/``, ``malignant/``, ``normal/`` holding ``<name>.png`` and its mask
  ``<name>_mask.png``; an image with several lesions has further masks ``<name>_mask_1.png``, ``<name>_mask_2.png``
  ... The masks of an image are merged **by union** into one binary mask (every pixel above 0 in any of them is
  ``lesion``, 1); an image without any mask (the ``normal`` images of some releases) gets an all-zero mask. A mask
  whose size differs from its image is refused. Images whose three colour channels are equal (BUSI stores grey
  scans as RGB) are written as one grey channel. The case id is the name (prefixed ``<class>_`` unless it starts
  with the class) with characters other than letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``
  (``benign/benign (12).png`` -> ``benign_12``).
* **CAMUS** (echocardiography): ``patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz`` with the reference
  ``..._gt.nii.gz``; labels 1 left-ventricle cavity, 2 left-ventricle myocardium, 3 left atrium. The
  ``half_sequence`` cines carry no reference and are left out. Case id: the file's stem (``patient0001_2CH_ED``).

:func:`prepare_layout` turns such a folder into a paired folder (``images/`` + ``masks/`` + ``dataset.yaml`` naming
the labels and ``modality: ultrasound``) once, cached in ``DATA/.medseg-layout/<layout>-<key>/`` (the key digests
every file's name, size and modification time, so a changed dataset is converted again); CAMUS files are hard
linked where the file system allows, else copied. The conversion is written to a temporary folder and renamed when
complete. :func:`medseg.data.layouts.load_manifest` calls it first, so ``medseg verify-data`` and ``medseg train``
read these layouts as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medseg.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "BUSI_CLASSES",
    "BUSI_LABELS",
    "CACHE_FOLDER",
    "CAMUS_LABELS",
    "busi_cases",
    "camus_cases",
    "is_busi_dataset",
    "is_camus_dataset",
    "prepare_layout",
]

BUSI_CLASSES = ("benign", "malignant", "normal")
BUSI_LABELS = ("background", "lesion")
CAMUS_LABELS = ("background", "lv_cavity", "lv_myocardium", "left_atrium")
CACHE_FOLDER = ".medseg-layout"
_DONE = "layout.json"
_VERSION = 1
_MASK_RE = re.compile(r"^(?P<name>.+)_mask(?:_(?P<k>\d+))?$")
_CAMUS_RE = re.compile(r"^(?P<patient>patient\d{4})_(?P<view>2CH|4CH)_(?P<phase>ED|ES)(?P<gt>_gt)?\.nii(?:\.gz)?$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def is_busi_dataset(root: str | Path) -> bool:
    """Whether ``root`` holds BUSI class folders (one of benign/malignant/normal with a ``*_mask.png``)."""
    root = Path(root)
    if not root.is_dir() or (root / "images").is_dir() or (root / "dataset.json").is_file():
        return False
    folders = [root / c for c in BUSI_CLASSES if (root / c).is_dir()]
    return any(_MASK_RE.match(p.stem) for folder in folders for p in _pngs(folder))


def is_camus_dataset(root: str | Path) -> bool:
    """Whether ``root`` holds CAMUS patient folders (``patientNNNN/patientNNNN_*_gt.nii.gz``)."""
    root = Path(root)
    if not root.is_dir() or (root / "images").is_dir() or (root / "dataset.json").is_file():
        return False
    for folder in root.glob("patient[0-9][0-9][0-9][0-9]"):
        if folder.is_dir() and any((m := _CAMUS_RE.match(p.name)) and m["gt"] for p in folder.iterdir()):
            return True
    return False


def _case_id(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "case"


def busi_cases(root: str | Path) -> list[tuple[str, Path, list[Path]]]:
    """``(case id, image, masks)`` of every BUSI image, sorted by case id (``masks`` may be empty).

    Raises:
        DataError: a mask without its image, or two images with the same case id.
    """
    root = Path(root)
    cases: dict[str, tuple[str, Path, list[Path]]] = {}
    for cls in BUSI_CLASSES:
        folder = root / cls
        if not folder.is_dir():
            continue
        files = _pngs(folder)
        masks: dict[str, list[tuple[int, Path]]] = {}
        images = []
        for path in files:
            match = _MASK_RE.match(path.stem)
            if match:
                masks.setdefault(match["name"], []).append((int(match["k"] or 0), path))
            else:
                images.append(path)
        names = {p.stem for p in images}
        orphans = sorted(str(p.relative_to(root)) for n, ms in masks.items() if n not in names for _, p in ms)
        if orphans:
            raise DataError(
                f"BUSI masks without their image: {orphans[:5]}",
                expected="<name>.png next to every <name>_mask.png / <name>_mask_<k>.png",
                hint="restore the missing images or remove the stray masks",
                path=folder,
            )
        for image in images:
            stem = image.stem if image.stem.lower().startswith(cls) else f"{cls}_{image.stem}"
            case = _case_id(stem)
            if case in cases:
                raise DataError(
                    f"BUSI images {cases[case][1].name} and {image.name} both become case {case!r}",
                    expected="image names that differ in letters or digits",
                    path=folder,
                )
            cases[case] = (case, image, [p for _, p in sorted(masks.get(image.stem, []))])
    return [cases[k] for k in sorted(cases)]


def camus_cases(root: str | Path) -> list[tuple[str, Path, Path | None]]:
    """``(case id, image, reference or None)`` of every CAMUS ED/ES view, sorted by case id."""
    root = Path(root)
    found: dict[str, dict[str, Path]] = {}
    for folder in sorted(root.glob("patient[0-9][0-9][0-9][0-9]")):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = _CAMUS_RE.match(path.name)
            if match and match["patient"] == folder.name:
                case = f"{match['patient']}_{match['view']}_{match['phase']}"
                found.setdefault(case, {})["label" if match["gt"] else "image"] = path
    missing = sorted(c for c, parts in found.items() if "image" not in parts)
    if missing:
        raise DataError(
            f"CAMUS references without their image: {missing[:5]}",
            expected="patientNNNN_<view>_<phase>.nii.gz next to every ..._gt.nii.gz",
            path=root,
        )
    return [(c, found[c]["image"], found[c].get("label")) for c in sorted(found)]


def _key(root: Path, layout: str) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and CACHE_FOLDER not in p.relative_to(root).parts)
    parts = [layout, _VERSION] + [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path.name} ({exc})", expected="a PNG image", path=path) from exc


def _write_busi(root: Path, out: Path) -> int:
    from PIL import Image

    cases = busi_cases(root)
    for case, image_path, mask_paths in cases:
        image = _read_png(image_path)
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.ndim == 3 and all(np.array_equal(image[..., 0], image[..., k]) for k in (1, 2)):
            image = image[..., 0]  # a grey scan stored as RGB
        lesion = np.zeros(image.shape[:2], dtype=bool)
        for mask_path in mask_paths:
            mask = _read_png(mask_path)
            mask = mask.max(axis=2) if mask.ndim == 3 else mask
            if mask.shape != lesion.shape:
                raise DataError(
                    f"BUSI mask {mask_path.name} is {mask.shape[1]} x {mask.shape[0]} pixels",
                    expected=f"the size of {image_path.name}: {lesion.shape[1]} x {lesion.shape[0]}",
                    path=mask_path,
                )
            lesion |= mask > 0
        Image.fromarray(image).save(out / "images" / f"{case}.png")
        Image.fromarray(lesion.astype(np.uint8)).save(out / "masks" / f"{case}.png")
    labels = dict(enumerate(BUSI_LABELS))
    meta = {"name": "busi", "labels": labels, "modality": "ultrasound"}
    (out / "dataset.yaml").write_text(json.dumps(meta, indent=2))  # JSON is valid YAML
    return len(cases)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target)


def _write_camus(root: Path, out: Path) -> int:
    cases = camus_cases(root)
    for case, image, label in cases:
        _link(image, out / "images" / f"{case}.nii.gz")
        if label is not None:
            _link(label, out / "masks" / f"{case}.nii.gz")
    meta = {"name": "camus", "labels": dict(enumerate(CAMUS_LABELS)), "modality": "ultrasound"}
    (out / "dataset.yaml").write_text(json.dumps(meta, indent=2))
    return len(cases)


def prepare_layout(root: str | Path) -> Path:
    """The folder to read for ``root``: a BUSI or CAMUS folder converted to a paired folder (cached), else ``root``.

    Raises:
        DataError: see :func:`busi_cases` / :func:`camus_cases`, a mask of the wrong size, unreadable images, or a
            dataset folder that cannot be written.
    """
    root = Path(root)
    layout = "busi" if is_busi_dataset(root) else "camus" if is_camus_dataset(root) else None
    if layout is None:
        return root
    target = root / CACHE_FOLDER / f"{layout}-{_key(root, layout)}"
    if (target / _DONE).is_file():
        logger.info("%s: %s layout, reusing %s", root, layout, target)
        return target
    try:
        (root / CACHE_FOLDER).mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root / CACHE_FOLDER))
    except OSError as err:
        raise DataError(
            f"cannot write the converted {layout} layout in {root} ({err.strerror})",
            expected="a writable dataset folder",
            hint=f"convert a copy of the dataset, or make {root} writable",
            path=root,
        ) from err
    try:
        (scratch / "images").mkdir()
        (scratch / "masks").mkdir()
        n = (_write_busi if layout == "busi" else _write_camus)(root, scratch)
        (scratch / _DONE).write_text(json.dumps({"layout": layout, "source": str(root), "cases": n}))
        if target.exists():  # converted meanwhile by another process
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("%s: %s layout, %d images converted to the paired folder %s", root, layout, n, target)
    return target
