"""Dataset folder layouts: find out which one a folder follows and read it into a :class:`Manifest`.

Three layouts are understood, tried in this order:

* **nnU-Net v2 raw** (``DatasetXXX_Name/``): ``dataset.json`` with ``channel_names``, ``labels`` (name → value),
  ``file_ending``, ``numTraining``; ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per channel),
  ``labelsTr/{case}{file_ending}``, optional ``imagesTs/``.
* **MSD** (Medical Segmentation Decathlon, also nnU-Net v1): ``dataset.json`` with ``training`` (image/label pairs),
  ``test``, ``modality`` (index → channel name) and ``labels`` (value → name). A multi-channel MSD image is one 4D
  file, so its :class:`Case` has one image path and the channels come from ``modality``.
* **paired**: ``images/`` and ``labels/`` (or ``masks/``, never both) whose files share a case id (the file name
  without its extension); images and labels may be in any format :func:`medseg.io.load_image` reads, and the
  manifest's ``file_ending`` is the most common image extension. When every image name ends in ``_XXXX`` and no
  label is named like the full image name, the suffix is a channel index (``ct_01_0000``, ``ct_01_0001`` → case
  ``ct_01`` with two channels). An optional ``dataset.yaml`` (or ``dataset.json``) may give ``labels``,
  ``modality`` / ``channel_names`` and ``name``. Without it ``label_names`` is ``()``: the label set is not guessed
  from file names but inferred later from the label files (``verify_dataset`` then only checks that values are
  non-negative integers). Images without a label become test cases.

  The **2D layout** is a paired folder of 2D images (as in ISIC, BUSI or Kvasir-SEG): ``images/`` + ``masks/`` (or
  ``labels/``) of PNG, TIFF, JPEG, BMP or single-file DICOM images sharing case ids, each mask one channel of label
  values (0 = background, 1, 2, ...), and an optional ``dataset.yaml`` such as
  ``{name: busi, labels: {0: background, 1: lesion}, modality: ultrasound}``. When the channels are not declared,
  the first image's header gives their number: a colour image has channels ``("red", "green", "blue")``, a grey one
  the declared modality (or ``channel_0``).
* **BUSI** and **CAMUS** (ultrasound): class folders of PNGs with ``_mask`` files, or ``patientNNNN/`` NIfTI
  views with ``_gt`` references; converted once to a 2D paired folder (:mod:`medseg.data.us_layouts`).
* **slides**: ``slides/`` of whole-slide images and ``annotations/`` (QuPath GeoJSON or label images); cut into tiles
  once (:mod:`medseg.data.slide_layout`) and read as the 2D paired folder of those tiles.

:func:`load_manifest` raises :class:`DataError` only when the layout itself cannot be understood (no layout, bad
JSON, missing keys, nnU-Net channel files missing). Files that an understood layout names but that are absent, such
as a missing label, are left to :func:`medseg.data.verify.verify_dataset`, which reports every problem at once.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.core.errors import DataError
from medseg.data.manifest import (
    IMAGE_EXTENSIONS,
    Case,
    LayoutName,
    Manifest,
    image_extension,
    infer_modality,
    parse_channel_names,
    parse_label_names,
    read_json,
    read_meta_file,
    require_key,
    strip_image_extension,
)
from medseg.io.raster import DICOM_SUFFIXES, RASTER_SUFFIXES, raster_channels

logger = logging.getLogger(__name__)

EXPECTED_LAYOUTS = (
    "one of: MSD (dataset.json + imagesTr/labelsTr), nnU-Net raw (DatasetXXX_Name with dataset.json "
    "channel_names/labels), paired (images/ + labels/) or 2D paired (images/ + masks/)"
)
LABEL_FOLDERS = ("labels", "masks")
RGB_CHANNELS = ("red", "green", "blue")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NNUNET_DIR_RE = re.compile(r"^Dataset\d{3}_.+$")


def detect_layout(root: str | Path) -> LayoutName:
    """Return the layout of a dataset folder: ``"nnunet"``, ``"msd"`` or ``"paired"``.

    Raises:
        DataError: the folder is missing, empty, or follows none of the layouts (the message lists what was looked
            for), or its dataset.json is not valid JSON.
    """
    root = _check_root(Path(root))
    meta_path = root / "dataset.json"
    meta = read_json(meta_path) if meta_path.is_file() else None
    if meta is not None and "channel_names" in meta:
        return "nnunet"
    if meta is not None and "training" in meta:
        return "msd"
    if _NNUNET_DIR_RE.match(root.name) and (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir() and _paired_label_dir(root) is not None:
        return "paired"
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8])
    what = f"{root} follows no known dataset layout (it holds: {found})"
    if meta is not None:
        what = f"{meta_path} has neither 'channel_names' (nnU-Net) nor 'training' (MSD)"
        what += f", and {root} has no images/ + labels/ (or masks/)"
    raise DataError(what, expected=EXPECTED_LAYOUTS, hint=_subfolder_hint(root), path=root)


def load_manifest(root: str | Path) -> Manifest:
    """Detect the layout of ``root`` and read it into a :class:`Manifest`.

    Only paths are read, except in a paired folder of 2D images without declared channels, where the first image's
    header gives the channel count.

    Args:
        root: the dataset folder.

    Returns:
        The manifest; cases and test cases are sorted by case id.

    Raises:
        DataError: the layout cannot be understood (see the module docstring); the message names the file and key.

    Examples::

        >>> manifest = load_manifest("Task03_Liver")
        >>> manifest.layout, manifest.label_names
        ('msd', ('background', 'liver', 'cancer'))
    """
    root = Path(root)
    from medseg.data.slide_layout import is_slide_dataset, tile_slide_dataset

    if is_slide_dataset(root):  # slides + annotations: segmented as the cached tiles' 2D paired folder
        root = tile_slide_dataset(root, task="segmentation")
    from medseg.data.us_layouts import prepare_layout

    root = prepare_layout(root)  # BUSI / CAMUS: read as the paired folder they convert to (cached in DATA)
    layout = detect_layout(root)
    loader = {"msd": _load_msd, "nnunet": _load_nnunet, "paired": _load_paired}[layout]
    manifest = loader(root)
    _check_unique_ids(manifest.cases + manifest.test_cases, root)
    logger.info(
        "%s: %s layout, %d training and %d test cases, channels %s, labels %s",
        root,
        layout,
        len(manifest.cases),
        len(manifest.test_cases),
        list(manifest.channel_names),
        list(manifest.label_names) or "(inferred from label files)",
    )
    return manifest


# --------------------------------------------------------------------------------------------------- layouts


def _load_msd(root: Path) -> Manifest:
    path = root / "dataset.json"
    meta = read_json(path)
    training = require_key(meta, "training", path)
    if not isinstance(training, list):
        raise DataError(f"{path}: 'training' is not a list", expected='[{"image": ..., "label": ...}, ...]', path=path)
    channel_names = parse_channel_names(require_key(meta, "modality", path), path, "modality")
    label_names = parse_label_names(require_key(meta, "labels", path), path)
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: training[{i}] is not an object", expected='{"image": ..., "label": ...}', path=path
            )
        image = _entry_path(entry, "image", f"training[{i}]", path)
        cases.append(Case(_case_id(image), (image,), _entry_path(entry, "label", f"training[{i}]", path)))
    test_cases = []
    for i, entry in enumerate(meta.get("test") or []):
        image = _entry_path(entry, "image", f"test[{i}]", path) if isinstance(entry, dict) else _resolve(root, entry)
        test_cases.append(Case(_case_id(image), (image,), None))
    endings = Counter(image_extension(c.images[0].name) or c.images[0].suffix for c in cases + test_cases)
    return Manifest(
        root=root,
        layout="msd",
        name=str(meta.get("name") or root.name),
        cases=tuple(sorted(cases, key=lambda c: c.case_id)),
        test_cases=tuple(sorted(test_cases, key=lambda c: c.case_id)),
        channel_names=channel_names,
        label_names=label_names,
        modality=infer_modality(channel_names),
        file_ending=endings.most_common(1)[0][0] if endings else ".nii.gz",
    )


def _load_nnunet(root: Path) -> Manifest:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(
            f"{root} looks like an nnU-Net raw folder but has no dataset.json",
            expected="dataset.json with channel_names, labels, numTraining, file_ending",
            hint="write dataset.json as nnU-Net v2 describes (nnunetv2 generate_dataset_json)",
            path=root,
        )
    meta = read_json(path)
    channel_names = parse_channel_names(require_key(meta, "channel_names", path), path, "channel_names")
    if "regions_class_order" in meta:
        raise DataError(
            f"{path} declares regions_class_order: region-based labels not supported",
            expected="one integer value per label",
            hint="convert the regions to plain labels first",
            path=path,
        )
    label_names = parse_label_names(require_key(meta, "labels", path), path)
    file_ending = require_key(meta, "file_ending", path)
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DataError(f"{path}: file_ending is {file_ending!r}", expected='an extension such as ".nii.gz"', path=path)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{root} has no imagesTr/ folder", expected="imagesTr/{case}_0000" + file_ending, path=root)
    train = _scan_channel_files(images_dir, file_ending, len(channel_names))
    cases = tuple(Case(cid, paths, labels_dir / f"{cid}{file_ending}") for cid, paths in train.items())
    if labels_dir.is_dir():
        orphans = sorted(p.name for p in labels_dir.glob(f"*{file_ending}") if p.name[: -len(file_ending)] not in train)
        if orphans:
            logger.warning("%s: %d label(s) without an image are ignored: %s", labels_dir, len(orphans), orphans[:5])
    num_training = meta.get("numTraining")
    if isinstance(num_training, int) and num_training != len(cases):
        logger.warning("%s: numTraining is %d but imagesTr/ holds %d cases", path, num_training, len(cases))
    test_dir = root / "imagesTs"
    test = _scan_channel_files(test_dir, file_ending, len(channel_names)) if test_dir.is_dir() else {}
    return Manifest(
        root=root,
        layout="nnunet",
        name=str(meta.get("name") or root.name),
        cases=cases,
        test_cases=tuple(Case(cid, paths, None) for cid, paths in test.items()),
        channel_names=channel_names,
        label_names=label_names,
        modality=infer_modality(channel_names),
        file_ending=file_ending,
    )


def _paired_label_dir(root: Path) -> Path | None:
    """The label folder of a paired layout, ``labels/`` or ``masks/``; None when there is none.

    Raises:
        DataError: both exist, so which one holds the labels is ambiguous.
    """
    found = [root / name for name in LABEL_FOLDERS if (root / name).is_dir()]
    if len(found) > 1:
        raise DataError(
            f"{root} has both labels/ and masks/ next to images/",
            expected="one folder of label files (labels/ or masks/)",
            hint="keep the label files in one of them and move the other folder away",
            path=root,
        )
    return found[0] if found else None


def _paired_channel_count(image: Path) -> int | None:
    """Channels of a 2D image from its header (None for volumes and unreadable files, left to verify_dataset)."""
    if not (image.name.lower().endswith(RASTER_SUFFIXES) or image.name.lower().endswith(DICOM_SUFFIXES)):
        return None
    try:
        return raster_channels(image)
    except DataError as err:
        logger.debug("cannot read the channel count of %s: %s", image, err)
        return None


def _load_paired(root: Path) -> Manifest:
    meta, meta_path = read_meta_file(root)
    images_dir, labels_dir = root / "images", _paired_label_dir(root) or root / "labels"
    image_files, label_files = _image_files(images_dir), _image_files(labels_dir)
    if not image_files:
        raise DataError(
            f"{images_dir} holds no image files", expected=f"files ending in {', '.join(IMAGE_EXTENSIONS)}", path=root
        )
    labels: dict[str, Path] = {}
    for p in label_files:
        stem = strip_image_extension(p.name) or p.name
        if stem in labels:
            raise DataError(
                f"two label files for case {stem!r} in {labels_dir} ({labels[stem].name} and {p.name})",
                expected="one label file per case id",
                hint="rename or remove one of them",
                path=labels_dir,
            )
        labels[stem] = p
    groups = _group_paired(image_files, set(labels))
    cases, test_cases, used = [], [], set()
    for cid, paths in groups.items():
        label_id = cid if cid in labels else f"{cid}_0000" if f"{cid}_0000" in labels else None
        if label_id is None:
            test_cases.append(Case(cid, paths, None))
        else:
            used.add(label_id)
            cases.append(Case(cid, paths, labels[label_id]))
    orphans = sorted(set(labels) - used)
    if orphans:
        logger.warning("%s: %d label(s) without an image are ignored: %s", labels_dir, len(orphans), orphans[:5])
    raw_channels = meta.get("channel_names", meta.get("modality"))
    declared_modality = meta.get("modality") if isinstance(meta.get("modality"), str) else None
    if isinstance(raw_channels, dict):
        channel_names = parse_channel_names(raw_channels, meta_path or root, "channel_names")
    else:
        n = max(len(paths) for paths in groups.values())
        first = next(iter(groups.values()))[0]
        per_file = _paired_channel_count(first) if n == 1 else None
        if per_file == 3:
            channel_names = RGB_CHANNELS
        else:
            n = per_file or n
            single = (declared_modality,) if declared_modality and n == 1 else None
            channel_names = single or tuple(f"channel_{i}" for i in range(n))
    modality = infer_modality(channel_names)
    if declared_modality:
        inferred = infer_modality([declared_modality])
        modality = inferred if inferred != "unknown" else declared_modality.strip()
    label_names = parse_label_names(meta["labels"], meta_path or root) if "labels" in meta else ()
    endings = Counter(image_extension(p.name) or p.suffix for p in image_files)
    return Manifest(
        root=root,
        layout="paired",
        name=str(meta.get("name") or root.name),
        cases=tuple(cases),
        test_cases=tuple(test_cases),
        channel_names=channel_names,
        label_names=label_names,
        modality=modality,
        file_ending=endings.most_common(1)[0][0],
    )


# --------------------------------------------------------------------------------------------------- helpers


def _check_root(root: Path) -> Path:
    hint = "pass the folder that holds dataset.json, or images/ and labels/ (or masks/)"
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist", expected=EXPECTED_LAYOUTS, hint=hint, path=root)
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a dataset folder", expected=EXPECTED_LAYOUTS, hint=hint, path=root)
    if not any(root.iterdir()):
        raise DataError(f"dataset folder {root} is empty", expected=EXPECTED_LAYOUTS, hint=hint, path=root)
    return root


def _subfolder_hint(root: Path) -> str:
    candidates = [
        p.name
        for p in sorted(root.iterdir())
        if p.is_dir()
        and (
            (p / "dataset.json").is_file()
            or ((p / "images").is_dir() and any((p / name).is_dir() for name in LABEL_FOLDERS))
        )
    ]
    if candidates:
        return f"did you mean the subfolder {', '.join(repr(c) for c in candidates[:3])}?"
    return "arrange the folder as one of these layouts (see medseg.data.layouts)"


def _resolve(root: Path, value: Any) -> Path:
    return root / Path(str(value))


def _entry_path(entry: Mapping[str, Any], key: str, where: str, path: Path) -> Path:
    if not entry.get(key):
        raise DataError(f"{path}: {where} lacks the key {key!r}", expected=f'{{"{key}": "./...", ...}}', path=path)
    return _resolve(path.parent, entry[key])


def _case_id(image: Path) -> str:
    return strip_image_extension(image.name) or image.stem


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and image_extension(p.name))


def _scan_channel_files(folder: Path, ending: str, n_channels: int) -> dict[str, tuple[Path, ...]]:
    """Group nnU-Net ``{case}_{XXXX}{ending}`` files by case; every case must have channels 0..n-1 exactly."""
    groups: dict[str, dict[int, Path]] = {}
    bad: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not p.name.endswith(ending):
            continue
        match = _CHANNEL_RE.match(p.name[: -len(ending)])
        if match is None:
            bad.append(p.name)
            continue
        groups.setdefault(match["case"], {})[int(match["channel"])] = p
    if bad:
        raise DataError(
            f"{folder}: {len(bad)} file(s) lack the channel suffix _XXXX: {', '.join(bad[:5])}",
            expected=f"one file per channel named {{case}}_0000{ending}, {{case}}_0001{ending}, ...",
            hint="rename the files; channel 0 ends in _0000",
            path=folder,
        )
    faults = []
    for cid, chans in groups.items():
        missing = sorted(set(range(n_channels)) - set(chans))
        extra = sorted(set(chans) - set(range(n_channels)))
        if missing:
            faults.append(f"{cid} lacks {', '.join(f'{cid}_{i:04d}{ending}' for i in missing)}")
        if extra:
            faults.append(f"{cid} has undeclared {', '.join(f'{cid}_{i:04d}{ending}' for i in extra)}")
    if faults:
        more = f" (and {len(faults) - 5} more)" if len(faults) > 5 else ""
        raise DataError(
            f"{folder}: {len(faults)} case(s) do not match the {n_channels} channel(s) of dataset.json channel_names: "
            + "; ".join(faults[:5])
            + more,
            expected=f"files _0000 to _{n_channels - 1:04d} for every case",
            hint="add the missing channel files or fix channel_names in dataset.json",
            path=folder,
        )
    return {cid: tuple(chans[i] for i in range(n_channels)) for cid, chans in sorted(groups.items())}


def _group_paired(files: list[Path], label_ids: set[str]) -> dict[str, tuple[Path, ...]]:
    """Group paired-layout images into cases; ``_XXXX`` suffixes are channels only when that reading is consistent."""
    stems = {p: strip_image_extension(p.name) or p.name for p in files}
    matches = {p: _CHANNEL_RE.match(s) for p, s in stems.items()}
    groups: dict[str, dict[int, Path]] = {}
    channel_mode = all(matches.values()) and not all(s in label_ids for s in stems.values())
    if channel_mode:
        for p, m in matches.items():
            if m is not None:
                groups.setdefault(m["case"], {})[int(m["channel"])] = p
        channel_mode = all(0 in chans for chans in groups.values())
    if not channel_mode:
        groups = {}
        for p, stem in stems.items():
            if stem in groups:
                raise DataError(
                    f"case id {stem!r} is used twice in {p.parent} ({groups[stem][0].name} and {p.name})",
                    expected="one image file per case id",
                    hint="rename or remove one of them",
                    path=p.parent,
                )
            groups[stem] = {0: p}
    for cid, chans in groups.items():
        if sorted(chans) != list(range(len(chans))):
            logger.warning("case %s has channels %s, not 0..%d", cid, sorted(chans), len(chans) - 1)
    return {cid: tuple(chans[i] for i in sorted(chans)) for cid, chans in sorted(groups.items())}


def _check_unique_ids(cases: tuple[Case, ...], root: Path) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            first = seen[case.case_id]
            raise DataError(
                f"case id {case.case_id!r} is used twice in {root} ({first.images[0].name} and {case.images[0].name})",
                expected="one file (or channel group) per case id",
                hint="rename or remove one of them",
                path=root,
            )
        seen[case.case_id] = case
