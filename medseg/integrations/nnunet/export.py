"""Write any medseg-readable dataset as an nnU-Net v2 raw dataset (``DatasetXXX_Name/``).

Output layout (nnU-Net v2 "dataset format")::

    DatasetXXX_Name/
        dataset.json          channel_names, labels (name -> value), numTraining, file_ending, name, description
        imagesTr/{case}_{0000..}.nii.gz   one file per channel
        labelsTr/{case}.nii.gz
        imagesTs/{case}_{0000..}.nii.gz   test cases (no label), if the source has any

Geometry is preserved exactly: a source file that already is a single-channel ``.nii.gz`` is copied byte for byte
(voxels, dtype, header untouched); any other file (NRRD, MetaImage, ``.nii``, a 4D multi-channel MSD image) is read
with :func:`medseg.io.load_image` and written with :func:`medseg.io.save_image` / :func:`medseg.io.save_mask`, which
keep the voxel-to-world affine. The dataset is assembled in a hidden folder beside the target and moved into place
at the end, so a failed export leaves nothing that nnU-Net could mistake for a dataset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medseg.core.errors import ConfigError, DataError
from medseg.data import Case, Manifest, load_manifest

logger = logging.getLogger(__name__)

__all__ = ["FILE_ENDING", "dataset_folder_name", "export_nnunet_raw", "find_dataset_folder"]

FILE_ENDING = ".nii.gz"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` for an id in 1..999 and a name of letters, digits, ``_`` and ``-``."""
    _check_id(dataset_id)
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"nnU-Net dataset name {name!r} is not allowed",
            expected="letters, digits, '_' and '-', starting with a letter or digit",
            hint="pass --name with such a name",
        )
    return f"Dataset{dataset_id:03d}_{name}"


def find_dataset_folder(root: str | Path, dataset_id: int) -> Path | None:
    """The ``DatasetXXX_*`` folder of ``dataset_id`` under ``root``, or ``None``.

    Raises:
        ConfigError: more than one folder carries that id (nnU-Net would refuse the id as ambiguous).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if len(found) > 1:
        raise ConfigError(
            f"{root} holds {len(found)} folders for dataset id {dataset_id}: {', '.join(p.name for p in found)}",
            expected="one DatasetXXX_Name folder per id",
            hint="remove all but one, or choose another id",
            path=root,
        )
    return found[0] if found else None


def export_nnunet_raw(data_dir: str | Path, out_root: str | Path, dataset_id: int, name: str | None = None) -> Path:
    """Export a dataset folder (MSD, nnU-Net raw or paired layout) as nnU-Net v2 raw data.

    Args:
        data_dir: any dataset folder :func:`medseg.data.load_manifest` reads.
        out_root: the nnU-Net raw folder (what ``nnUNet_raw`` would point at); created if missing.
        dataset_id: nnU-Net dataset id, 1..999.
        name: dataset name (letters, digits, ``_``, ``-``); default: the source's name, sanitised.

    Returns:
        The new ``out_root/DatasetXXX_Name`` folder.

    Raises:
        ConfigError: the id is outside 1..999, the name is not allowed, or ``out_root`` already holds a dataset with
            that id.
        DataError: the source is unreadable, a label's grid differs from its image's, label values are not
            consecutive from 0, or the dataset has no labelled case.

    Examples::

        >>> folder = export_nnunet_raw("Task04_Hippocampus", "nnUNet_raw", 501)
        >>> folder.name
        'Dataset501_Hippocampus'
    """
    _check_id(dataset_id)
    manifest = load_manifest(data_dir)
    if not manifest.cases:
        raise DataError(
            f"{manifest.root} has no labelled case", expected="at least one image with a label", path=manifest.root
        )
    folder_name = dataset_folder_name(dataset_id, name if name is not None else _sanitise(manifest.name))
    out_root = Path(out_root)
    existing = find_dataset_folder(out_root, dataset_id)
    if existing is not None:
        raise ConfigError(
            f"{existing} already exists",
            expected=f"no other Dataset{dataset_id:03d}_* folder in {out_root}",
            hint="choose another --id, or delete the old folder",
            path=existing,
        )
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.partial-", dir=out_root))
    try:
        meta = _write_dataset(manifest, staging, folder_name.split("_", 1)[1])
        (staging / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        target = out_root / folder_name
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %d training and %d test cases to %s", meta["numTraining"], len(manifest.test_cases), target)
    return target


# ----------------------------------------------------------------------------------------------------- internals


def _check_id(dataset_id: int) -> None:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int | np.integer) or not 1 <= dataset_id <= 999:
        raise ConfigError(
            f"nnU-Net dataset id {dataset_id!r} is out of range",
            expected="an integer from 1 to 999",
            hint="ids 1-500 are often taken by public datasets; 501-999 are free for your own",
        )


def _sanitise(name: str) -> str:
    # MSD names such as "Task04_Hippocampus" or "my dataset" become "Hippocampus" / "my_dataset".
    cleaned = re.sub(r"^Task\d+_|^Dataset\d{3}_", "", name.strip())
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", cleaned).strip("_-")
    return cleaned or "medseg"


def _write_dataset(manifest: Manifest, root: Path, name: str) -> dict:
    images_tr, labels_tr = root / "imagesTr", root / "labelsTr"
    images_tr.mkdir()
    labels_tr.mkdir()
    n_channels = _write_channels(manifest.cases[0], images_tr)
    seen_labels: set[int] = set()
    for i, case in enumerate(manifest.cases):
        if i:
            _same_channels(n_channels, _write_channels(case, images_tr), case)
        seen_labels |= _write_label(case, labels_tr / f"{case.case_id}{FILE_ENDING}")
    if manifest.test_cases:
        images_ts = root / "imagesTs"
        images_ts.mkdir()
        for case in manifest.test_cases:
            _same_channels(n_channels, _write_channels(case, images_ts), case)
    return {
        "name": name,
        "description": f"exported by medseg from {manifest.root} ({manifest.layout} layout)",
        "channel_names": {str(i): n for i, n in enumerate(_channel_names(manifest, n_channels))},
        "labels": _label_map(manifest, seen_labels),
        "numTraining": len(manifest.cases),
        "file_ending": FILE_ENDING,
    }


def _same_channels(expected: int, found: int, case: Case) -> None:
    if found != expected:
        raise DataError(
            f"case {case.case_id} has {found} channel(s) but earlier cases have {expected}",
            expected="the same channels in every case",
            path=case.images[0],
        )


def _write_channels(case: Case, folder: Path) -> int:
    """Write ``{case}_{XXXX}.nii.gz`` per channel; returns the number of channels."""
    from medseg.io import load_image, save_image

    index = 0
    for path in case.images:
        if _copyable(path) and _channels_in_header(path) == 1:
            _copy(path, folder / f"{case.case_id}_{index:04d}{FILE_ENDING}")
            index += 1
            continue
        image = load_image(path)  # another format, or a 4D multi-channel file: split it into one file per channel
        for c in range(image.shape[0]):
            save_image(image[c : c + 1], folder / f"{case.case_id}_{index:04d}{FILE_ENDING}")
            index += 1
    return index


def _write_label(case: Case, target: Path) -> set[int]:
    """Write the label on its own grid after checking it against the image; returns the label values present."""
    from medseg.io import load_image, save_mask

    if case.label is None or not case.label.is_file():
        raise DataError(
            f"label of case {case.case_id} not found: {case.label}",
            expected="a label file for every training case",
            hint="run `medseg verify-data` on the dataset",
            path=case.label,
        )
    label = load_image(case.label)
    image = load_image(case.images[0])
    if tuple(label.shape[1:]) != tuple(image.shape[1:]) or not np.allclose(
        np.asarray(label.affine), np.asarray(image.affine), rtol=0.0, atol=1e-4
    ):
        raise DataError(
            f"label of case {case.case_id} lies on another grid than its image "
            f"(shapes {tuple(label.shape[1:])} vs {tuple(image.shape[1:])})",
            expected="identical shape and affine (atol 1e-4), as nnU-Net requires",
            hint="run `medseg verify-data` on the dataset and resample the label onto the image",
            path=case.label,
        )
    values = label.numpy()
    if label.shape[0] != 1 or not np.array_equal(values, np.round(values)) or values.min() < 0:
        raise DataError(
            f"label of case {case.case_id} is not a single-channel map of non-negative integers",
            expected="one integer label value per voxel",
            path=case.label,
        )
    if _copyable(case.label):
        _copy(case.label, target)
    else:
        save_mask(label[0], label, target)
    return {int(v) for v in np.unique(values)}


def _copyable(path: Path) -> bool:
    return path.name.lower().endswith(FILE_ENDING)


def _channels_in_header(path: Path) -> int:
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # nibabel raises many types for a broken header; report it as medseg does
        raise DataError(f"cannot read {path.name} as NIfTI ({type(exc).__name__}: {exc})", path=path) from exc
    return int(shape[3]) if len(shape) == 4 else int(shape[4]) if len(shape) == 5 else 1


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DataError(f"{src} not found", expected="an existing image file", path=src)
    shutil.copyfile(src, dst)


def _channel_names(manifest: Manifest, n_channels: int) -> tuple[str, ...]:
    names = manifest.channel_names
    if len(names) == n_channels:
        return names
    # nnU-Net picks the intensity normalisation from the channel name: "CT" -> CT clipping + z-score, else z-score.
    fallback = "CT" if manifest.modality == "CT" else "zscore"
    logger.warning(
        "%s declares %d channel name(s) but the images have %d channels; naming them %r",
        manifest.root,
        len(names),
        n_channels,
        fallback,
    )
    return tuple(fallback for _ in range(n_channels))


def _label_map(manifest: Manifest, seen: set[int]) -> dict[str, int]:
    names: tuple[str, ...] = manifest.label_names
    if not names:
        top = max(seen | {1})
        names = ("background", *(f"label_{v}" for v in range(1, top + 1)))
        missing = sorted(set(range(top + 1)) - seen - {0})
        if missing:
            logger.warning("label values %s never occur in %s; nnU-Net will still train them", missing, manifest.root)
    extra = sorted(v for v in seen if v >= len(names))
    if extra:
        raise DataError(
            f"labels of {manifest.root} hold values {extra[:10]} beyond the declared {list(names)}",
            expected=f"values 0..{len(names) - 1}",
            hint="fix the labels or the 'labels' entry of the dataset metadata",
            path=manifest.root,
        )
    if len(set(names)) != len(names):
        raise DataError(
            f"label names {list(names)} of {manifest.root} are not unique",
            expected="one distinct name per label value (nnU-Net maps name -> value)",
            path=manifest.root,
        )
    return {name: value for value, name in enumerate(names)}
