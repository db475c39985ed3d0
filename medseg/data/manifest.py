"""The dataset manifest: which files make up each case, and what the channels and labels mean.

A :class:`Manifest` is the one description of a dataset that the rest of medseg reads, whatever layout the folder
had on disk (MSD, nnU-Net raw, paired folders of 3D volumes or 2D images). It holds paths only; no image is read to
build it. This module also holds the readers of dataset metadata (dataset.json / dataset.yaml, label and channel
mappings, file extensions) that the layouts in :mod:`medseg.data.layouts` share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medseg.core.errors import DataError
from medseg.core.keys import CASE_ID, IMAGE, LABEL

LayoutName = Literal["msd", "nnunet", "paired"]
LAYOUTS: tuple[str, ...] = ("msd", "nnunet", "paired")
#: Image file extensions of dataset folders: volumes, then 2D images (PNG, JPEG, TIFF, BMP, single DICOM files).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".dcm",
)
META_FILES: tuple[str, ...] = ("dataset.yaml", "dataset.yml", "dataset.json")
_LABELS_EXPECTED = '{"background": 0, "liver": 1} (nnU-Net) or {"0": "background", "1": "liver"} (MSD)'
_CT_TOKENS = {"CT", "CTA", "CECT", "NCCT"}
_MRI_TOKENS = {"MR", "MRI", "FLAIR", "ADC", "DWI", "DTI", "PD", "PDW", "SWI", "DCE", "HBV", "CINE", "BOLD", "T2STAR"}


@dataclass(frozen=True)
class Case:
    """One case of a dataset: its image files (one per channel) and its label file.

    Args:
        case_id: identifier of the case, unique within a manifest (e.g. ``"liver_003"``).
        images: image files in channel order. One file holding all channels (MSD 4D NIfTI) is a 1-tuple.
        label: label file, or ``None`` for a test case without a label.

    Examples::

        >>> case = Case("liver_003", (Path("imagesTr/liver_003.nii.gz"),), Path("labelsTr/liver_003.nii.gz"))
        >>> case.as_dict()["image"]
        ['imagesTr/liver_003.nii.gz']
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the MONAI dictionary-dataset item ``{"image": [str, ...], "label": str | None, "case_id": str}``."""
        return {
            IMAGE: [str(p) for p in self.images],
            LABEL: None if self.label is None else str(self.label),
            CASE_ID: self.case_id,
        }


@dataclass(frozen=True)
class Manifest:
    """A dataset folder understood: its layout, cases, channels and label names.

    Args:
        root: the dataset folder.
        layout: ``"msd"``, ``"nnunet"`` or ``"paired"``.
        name: dataset name (from dataset.json, else the folder name).
        cases: training cases, each with a label path (the file itself may be missing; see ``verify_dataset``).
        test_cases: cases without labels (``imagesTs/`` or unlabelled images of a paired folder); may be empty.
        channel_names: one name per input channel, channel order (e.g. ``("T2", "ADC")``).
        label_names: label names indexed by label value, background first. Empty when the dataset does not declare
            them (a paired folder without ``dataset.yaml``): the label set is then inferred from the label files.
        modality: ``"CT"``, ``"MRI"``, ``"PET"``, ``"US"`` or ``"unknown"``.
        file_ending: file extension of the images (e.g. ``".nii.gz"``).
    """

    root: Path
    layout: LayoutName
    name: str
    cases: tuple[Case, ...]
    test_cases: tuple[Case, ...] = field(default=())
    channel_names: tuple[str, ...] = field(default=())
    label_names: tuple[str, ...] = field(default=())
    modality: str = "unknown"
    file_ending: str = ".nii.gz"

    @property
    def num_channels(self) -> int:
        """Number of input channels the dataset declares."""
        return len(self.channel_names)

    @property
    def num_labels(self) -> int | None:
        """Number of label values including background, or ``None`` when the dataset does not declare them."""
        return len(self.label_names) or None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form; :meth:`from_dict` reads it back."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "name": self.name,
            "modality": self.modality,
            "file_ending": self.file_ending,
            "channel_names": list(self.channel_names),
            "label_names": list(self.label_names),
            "cases": [_case_to_dict(c) for c in self.cases],
            "test_cases": [_case_to_dict(c) for c in self.test_cases],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Rebuild a manifest written by :meth:`to_dict` (e.g. saved in a run directory).

        Raises:
            DataError: a required key is missing or the layout is unknown.
        """
        try:
            layout = data["layout"]
            if layout not in LAYOUTS:
                raise DataError(f"unknown manifest layout {layout!r}", expected=f"one of {', '.join(LAYOUTS)}")
            return cls(
                root=Path(data["root"]),
                layout=layout,
                name=str(data["name"]),
                cases=tuple(_case_from_dict(c) for c in data["cases"]),
                test_cases=tuple(_case_from_dict(c) for c in data.get("test_cases", [])),
                channel_names=tuple(data.get("channel_names", [])),
                label_names=tuple(data.get("label_names", [])),
                modality=str(data.get("modality", "unknown")),
                file_ending=str(data.get("file_ending", ".nii.gz")),
            )
        except KeyError as err:
            raise DataError(
                f"manifest dict lacks key {err.args[0]!r}", hint="pass the output of Manifest.to_dict()"
            ) from None


def _case_to_dict(case: Case) -> dict[str, Any]:
    return {"case_id": case.case_id, "images": [str(p) for p in case.images], "label": _opt_str(case.label)}


def _case_from_dict(data: dict[str, Any]) -> Case:
    label = data.get("label")
    return Case(str(data["case_id"]), tuple(Path(p) for p in data["images"]), None if label is None else Path(label))


def _opt_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


# ----------------------------------------------------------------------------- reading dataset metadata


def strip_image_extension(name: str) -> str | None:
    """Return ``name`` without a known image extension (``.nii.gz``, ``.nrrd``, ``.png`` ...), else ``None``."""
    ending = image_extension(name)
    return None if ending is None else name[: -len(ending)]


def image_extension(name: str) -> str | None:
    """Return the known image extension ``name`` ends with (``".nii.gz"`` rather than ``".gz"``), else ``None``."""
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[-len(ext) :]
    return None


def infer_modality(channel_names: Iterable[str]) -> str:
    """Guess the imaging modality from channel names.

    ``"CT"`` if any channel is CT; ``"MRI"`` for MR sequence names (T1, T1w, T1gd, T2, FLAIR, ADC, DWI ...);
    ``"PET"``; ``"US"`` for ultrasound; otherwise ``"unknown"`` (nnU-Net names such as ``"noNorm"`` or ``"zscore"``).
    """
    tokens = {tok for name in channel_names for tok in re.split(r"[^A-Z0-9*]+", str(name).upper()) if tok}
    if tokens & _CT_TOKENS:
        return "CT"
    if tokens & _MRI_TOKENS or any(tok.startswith(("T1", "T2")) for tok in tokens):
        return "MRI"
    if "PET" in tokens:
        return "PET"
    if tokens & {"US", "ULTRASOUND"}:
        return "US"
    return "unknown"


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; a file that is not valid JSON raises ``DataError`` naming the file, line and column."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})",
            hint="fix the file; a trailing comma or a missing quote is the usual cause",
            path=path,
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}", path=path) from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}", expected="a JSON object at the top level", path=path)
    return data


def read_meta_file(root: Path) -> tuple[dict[str, Any], Path | None]:
    """Read the first of ``dataset.yaml``, ``dataset.yml``, ``dataset.json`` in ``root``; ``({}, None)`` if none."""
    for name in META_FILES:
        path = root / name
        if not path.is_file():
            continue
        if path.suffix == ".json":
            return read_json(path), path
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not valid YAML: {err}".replace("\n", " "), path=path) from None
        if not isinstance(data, dict):
            raise DataError(f"{path} holds a {type(data).__name__}", expected="a YAML mapping", path=path)
        return data, path
    return {}, None


def require_key(meta: Mapping[str, Any], key: str, path: Path) -> Any:
    """Return ``meta[key]``; a missing key raises ``DataError`` naming the file and the key."""
    if key not in meta:
        raise DataError(
            f"{path} lacks the required key {key!r}",
            expected=f"keys {', '.join(sorted(set(meta) | {key}))}",
            hint=f"add {key!r} to {path.name}",
            path=path,
        )
    return meta[key]


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())


def parse_label_names(raw: Any, path: Path) -> tuple[str, ...]:
    """Label names indexed by value, from nnU-Net (name → value) or MSD (value → name) mappings."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f"{path}: 'labels' is {raw!r}", expected=f"a non-empty mapping like {_LABELS_EXPECTED}", path=path
        )
    by_value: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, list | tuple):
            raise DataError(
                f"{path}: label {key!r} is the region {list(value)}: region-based labels not supported",
                expected="one integer value per label",
                hint="convert the regions to plain labels first",
                path=path,
            )
        if _is_int(value):
            label_value, name = int(value), str(key)
        elif _is_int(key) and isinstance(value, str):
            label_value, name = int(key), value
        else:
            raise DataError(f"{path}: cannot read label entry {key!r}: {value!r}", expected=_LABELS_EXPECTED, path=path)
        if label_value in by_value:
            raise DataError(f"{path}: label value {label_value} is given twice", path=path)
        by_value[label_value] = name
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise DataError(
            f"{path}: label values {values} are not consecutive from 0",
            expected="0 (background), 1, 2, ...",
            hint="relabel so the values are consecutive (nnU-Net requires the same)",
            path=path,
        )
    return tuple(by_value[v] for v in values)


def parse_channel_names(raw: Any, path: Path, key: str) -> tuple[str, ...]:
    """Channel names in channel order from ``{"0": "T2", "1": "ADC"}``."""
    if isinstance(raw, str):
        return (raw,)
    if not isinstance(raw, dict) or not raw or not all(_is_int(k) for k in raw):
        raise DataError(f"{path}: {key!r} is {raw!r}", expected='a mapping like {"0": "T2", "1": "ADC"}', path=path)
    by_index = {int(k): str(v) for k, v in raw.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: {key!r} indices {sorted(by_index)} are not 0, 1, 2, ...", path=path)
    return tuple(by_index[i] for i in range(len(by_index)))
