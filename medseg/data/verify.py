"""Check every case of a dataset before training, and report all problems at once.

:func:`verify_dataset` reads each image and label through :mod:`medseg.io` and never stops at the first fault, so a
user fixes a broken dataset in one pass instead of one training crash at a time. Full images are read (not only
headers) because label values can only be checked on the voxels; one case is in memory at a time.

2D cases (PNG, JPEG, TIFF, BMP or single-file DICOM images, read as one-slice volumes ``(C, X, Y, 1)``) get the same
checks, except that a PNG/TIFF mask of a DICOM image, which holds a pixel grid without patient geometry, is compared
by shape only. A mask must hold label values: nothing is remapped, and the messages name the usual 2D mistakes - a
mask that stores 255 for foreground, a colour (RGB/RGBA) mask, a JPEG mask whose values compression has altered,
and an image and mask declaring different pixel sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from medseg.core.errors import DataError
from medseg.data.manifest import Case, Manifest
from medseg.io import load_image

logger = logging.getLogger(__name__)

ProblemKind = Literal[
    "no_cases",
    "missing_image",
    "missing_label",
    "unreadable",
    "channel_count",
    "shape_mismatch",
    "affine_mismatch",
    "label_values",
    "label_channels",
    "class_count",
]
PROBLEM_KINDS: tuple[str, ...] = get_args(ProblemKind)
AFFINE_ATOL_MM = 1e-3
CHANNEL_AFFINE_ATOL_MM = 1e-4  # the tolerance medseg.io.load_channels applies when stacking channel files
DATASET_CASE_ID = "(dataset)"
HINT_255 = "the mask stores 255 for foreground; save label values (0, 1, ...) instead"
_2D_FORMATS = ("raster", "dicom")


@dataclass(frozen=True)
class Problem:
    """One fault found in a dataset.

    Args:
        case_id: the case concerned, or ``"(dataset)"`` for a fault of the whole dataset.
        path: the file concerned (the dataset folder for dataset-wide faults), if any.
        kind: one of :data:`PROBLEM_KINDS`, e.g. ``"shape_mismatch"``.
        message: what is wrong, with the values found and expected.
    """

    case_id: str
    path: Path | None
    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return f"{self.case_id}: {self.kind}: {self.message}{where}"


def verify_dataset(manifest: Manifest, *, progress: Callable[[int, int], None] | None = None) -> list[Problem]:
    """Check every training and test case of ``manifest`` and return all problems found.

    Checks: the dataset has training cases; image and label files exist and are readable; the image has as many
    channels as ``manifest.channel_names``; the label has one channel, the image's spatial shape and affine (to
    1e-3 mm), and only integer values declared in ``manifest.label_names`` (only non-negative integers when the
    manifest declares no label names); the channel files of a case share one grid. Test cases get the image checks.
    2D cases are one-slice volumes checked the same way (see the module docstring for PNG/TIFF masks of DICOM images).

    Args:
        manifest: the dataset, from :func:`medseg.data.load_manifest`.
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        The problems in case order; empty when the dataset is clean.

    Examples::

        >>> problems = verify_dataset(load_manifest("Task03_Liver"))
        >>> print(format_problems(problems))
        liver_7: shape_mismatch: label spatial shape (512, 512, 74) differs from image (512, 512, 75) (...)
    """
    problems: list[Problem] = []
    if not manifest.cases:
        problems.append(
            Problem(DATASET_CASE_ID, manifest.root, "no_cases", "the dataset has no training cases with labels")
        )
    todo = [(case, True) for case in manifest.cases] + [(case, False) for case in manifest.test_cases]
    for done, (case, labelled) in enumerate(todo, start=1):
        problems.extend(_check_case(case, manifest, labelled))
        if progress is not None:
            progress(done, len(todo))
    bad_cases = len({p.case_id for p in problems})
    logger.info(
        "verified %d cases of %s: %d problem(s) in %d case(s)", len(todo), manifest.root, len(problems), bad_cases
    )
    return problems


def require_valid(manifest: Manifest) -> None:
    """Verify ``manifest``; every problem is logged and they raise one ``DataError`` naming the first.

    Raises:
        DataError: the dataset has at least one problem (see :func:`verify_dataset`).
    """
    problems = verify_dataset(manifest)
    if problems:
        for p in problems:
            logger.error("%s", p)
        raise DataError(
            f"{len(problems)} problem(s) in dataset {manifest.root}, first: {problems[0]}",
            hint=f"run `medseg verify-data {manifest.root}` for the full list",
        )


def format_problems(problems: Sequence[Problem]) -> str:
    """Return one line per problem, ``case_id: kind: message (path)``; an empty string when there are none."""
    return "\n".join(str(p) for p in problems)


@dataclass(frozen=True)
class _Grid:
    """What the label checks need from an image: channel count, spatial shape and affine (no voxels)."""

    channels: int
    shape: tuple[int, ...]
    affine: torch.Tensor
    source_format: str = ""


def _check_case(case: Case, manifest: Manifest, labelled: bool) -> list[Problem]:
    problems: list[Problem] = []
    grid = _image_grid(case, problems)
    declared = manifest.channel_names
    if grid is not None and declared and grid.channels != len(declared):
        problems.append(
            Problem(
                case.case_id,
                case.images[0],
                "channel_count",
                f"image has {grid.channels} channel(s), the dataset declares {len(declared)} ({', '.join(declared)})",
            )
        )
    if not labelled:
        return problems
    if case.label is None or not case.label.is_file():
        problems.append(Problem(case.case_id, case.label, "missing_label", "label file not found"))
        return problems
    label = _load(case.label, case.case_id, problems)
    if label is not None:
        problems += _check_label(case.case_id, case.label, label, grid, manifest.label_names)
    return problems


def _image_grid(case: Case, problems: list[Problem]) -> _Grid | None:
    """Read every image file of a case (one per channel, or one multi-channel file) and check they share a grid.

    Files are read one by one rather than with ``load_channels`` so that every unreadable channel file is reported,
    and a channel file on another grid is a ``shape_mismatch`` / ``affine_mismatch``, not an ``unreadable``.
    """
    grids: list[tuple[Path, _Grid]] = []
    for path in case.images:
        if not path.is_file():
            problems.append(Problem(case.case_id, path, "missing_image", "image file not found"))
            continue
        image = _load(path, case.case_id, problems)
        if image is not None:
            grids.append((path, _grid_of(image)))
    if not case.images or len(grids) != len(case.images):
        return None
    first_path, first = grids[0]
    if len(grids) > 1:
        problems += [
            Problem(case.case_id, p, "channel_count", f"{g.channels} channels in a file of a one-file-per-channel case")
            for p, g in grids
            if g.channels != 1
        ]
    for path, grid in grids[1:]:
        if grid.shape != first.shape:
            problems.append(
                Problem(
                    case.case_id,
                    path,
                    "shape_mismatch",
                    f"channel file shape {grid.shape} differs from {first_path.name} {first.shape}",
                )
            )
        diff = _max_diff(grid.affine, first.affine)
        if not diff <= CHANNEL_AFFINE_ATOL_MM:
            problems.append(
                Problem(
                    case.case_id,
                    path,
                    "affine_mismatch",
                    f"channel file affine differs from {first_path.name} by up to {diff:.4g} mm "
                    f"(tolerance {CHANNEL_AFFINE_ATOL_MM} mm, as medseg.io.load_channels requires)",
                )
            )
    return _Grid(sum(g.channels for _, g in grids), first.shape, first.affine, first.source_format)


def _grid_of(image: Any) -> _Grid:
    return _Grid(int(image.shape[0]), tuple(int(n) for n in image.shape[1:]), _affine_of(image), _source_format(image))


def _source_format(image: Any) -> str:
    meta = getattr(image, "meta", None)
    return str(meta.get("source_format", "")) if isinstance(meta, dict) else ""


def _affine_of(image: Any) -> torch.Tensor:
    return torch.as_tensor(image.affine, dtype=torch.float64).reshape(4, 4)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _load(path: Path, case_id: str, problems: list[Problem]) -> Any:
    """Read one file; on failure record an ``unreadable`` problem and return ``None``."""
    try:
        return load_image(path, allow_external_data=True)  # a dataset on local disk may use detached headers
    except DataError as err:
        problems.append(Problem(case_id, path, "unreadable", err.message))
    except Exception as err:  # noqa: BLE001 - a verifier must report any reader failure and go on with the next case
        problems.append(Problem(case_id, path, "unreadable", f"{type(err).__name__}: {err}"))
    return None


def _check_label(
    case_id: str, path: Path, label: Any, image: _Grid | None, label_names: tuple[str, ...]
) -> list[Problem]:
    problems: list[Problem] = []
    channels = int(label.shape[0])
    if channels != 1:
        message = f"label has {channels} channels, expected 1"
        if _source_format(label) in _2D_FORMATS and channels in (3, 4):
            message = (
                f"label is a colour (RGB/RGBA) image with {channels} channels; a mask must be one channel of label "
                "values: save it as a greyscale image whose pixel values are the labels (0, 1, ...)"
            )
            if bool(torch.all(label[1:3] == label[:1])):
                message += " (its colour channels are identical: keep one of them)"
        problems.append(Problem(case_id, path, "label_channels", message))
    if image is not None:
        shape = tuple(int(n) for n in label.shape[1:])
        if shape != image.shape:
            problems.append(
                Problem(
                    case_id, path, "shape_mismatch", f"label spatial shape {shape} differs from image {image.shape}"
                )
            )
        # A PNG/TIFF mask of a DICOM image is a pixel grid without patient geometry: only its shape can be checked.
        pixel_grid_only = _source_format(label) == "raster" and image.source_format not in ("raster", "")
        diff = 0.0 if pixel_grid_only else _max_diff(_affine_of(label), image.affine)
        if not diff <= AFFINE_ATOL_MM:
            message = f"label affine differs from the image's by up to {diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm)"
            if _source_format(label) == "raster" or image.source_format == "raster":
                message += (
                    "; the image and mask files declare different pixel sizes (PNG pHYs / TIFF resolution, 1 mm when"
                    " none is declared): save both with the same resolution, or none"
                )
            problems.append(Problem(case_id, path, "affine_mismatch", message))
    message = _label_value_fault(torch.as_tensor(label), label_names)
    if message:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            message += "; JPEG compression alters mask values: store masks as PNG"
        problems.append(Problem(case_id, path, "label_values", message))
    return problems


def _label_value_fault(label: torch.Tensor, label_names: tuple[str, ...]) -> str | None:
    """Describe label values that are not integers or not declared; ``None`` when all values are fine."""
    values = torch.unique(label.detach().reshape(-1).to(torch.float64))
    non_integer = values[~torch.isfinite(values) | (values != torch.round(values))]
    if non_integer.numel():
        shown = ", ".join(f"{v:g}" for v in non_integer[:5].tolist())
        return f"label has non-integer values ({shown}); labels must hold integer class values, not interpolated ones"
    if label_names:
        bad = values[(values < 0) | (values >= len(label_names))]
        declared = ", ".join(f"{i}={n}" for i, n in enumerate(label_names))
        expected = f"declared labels {declared}"
    else:
        bad = values[values < 0]
        expected = "non-negative integers"
    if bad.numel():
        shown = ", ".join(str(int(v)) for v in bad[:10].tolist())
        message = f"label has values {shown} outside the {expected}"
        if bad.tolist() == [255.0] and all(v in (0.0, 255.0) for v in values.tolist()):
            message += f"; hint: {HINT_255}"
        return message
    return None
