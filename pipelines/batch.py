"""The cases of a batch prediction: inputs expanded to cases, in a deterministic order, and split into parts.

``medseg predict RUN IN_DIR --num-parts N --part-id K`` lets N processes (a Slurm array, a Kubernetes indexed job)
share one batch, as nnU-Net's ``-num_parts``/``-part_id`` do: the cases are sorted by name and part ``K`` takes
every N-th case starting at ``K``, so the parts are disjoint, their union is the whole batch, and every process
computes the same split without talking to the others. With ``--skip-existing`` a case whose outputs are complete
(mask and statistics: the statistics are written last, both atomically) is not predicted again, so an interrupted
part can simply be rerun.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from medseg.core.errors import ConfigError, DataError
from medseg.data import strip_image_extension
from medseg.io import IMAGE_SUFFIXES
from medseg.io.header import image_suffix
from medseg.io.raster import DICOM_SUFFIXES

__all__ = ["case_name", "list_cases", "shard"]

#: Suffixes of files that are one case each inside a folder of cases (DICOM files belong to a series folder).
_CASE_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in DICOM_SUFFIXES)


def case_name(path: Path) -> str:
    """File or folder name without image extensions (``a.nii.gz`` → ``a``)."""
    name = path.name
    if name.lower().endswith(".zip"):
        return name[: -len(".zip")]
    return strip_image_extension(name) or name


def _is_folder_of_cases(folder: Path) -> bool:
    """A folder holding image files (NIfTI, NRRD, MHA, PNG, zip, ...) lists cases; otherwise it is a DICOM series."""
    return any(p.is_file() and image_suffix(p) in _CASE_SUFFIXES for p in folder.iterdir())


def list_cases(inputs: list[Path]) -> list[Path]:
    """Every case of ``inputs``, sorted by case name: files as given, DICOM series folders as given, and a folder of
    image files expanded to its image files and sub-folders (each sub-folder a DICOM series).

    Raises:
        DataError: an input that does not exist, or two cases with the same name (their outputs would collide).
    """
    cases: list[Path] = []
    for path in inputs:
        if not path.exists():
            raise DataError(f"{path} not found", expected="image files, DICOM folders, zips or folders of them")
        if path.is_dir() and _is_folder_of_cases(path):
            cases += [p for p in path.iterdir() if p.is_dir() or image_suffix(p) in _CASE_SUFFIXES]
        else:
            cases.append(path)
    cases.sort(key=lambda p: (case_name(p), str(p)))
    clashes = sorted(n for n, k in Counter(case_name(p) for p in cases).items() if k > 1)
    if clashes:
        raise DataError(
            f"{len(clashes)} case name(s) occur more than once: {', '.join(clashes[:5])}",
            expected="one input per case name (outputs are named <case>_seg.*)",
            hint="predict the folders into different --out folders",
        )
    return cases


def shard(cases: list[Path], num_parts: int, part_id: int) -> list[Path]:
    """Part ``part_id`` of ``num_parts``: every ``num_parts``-th case starting at ``part_id``.

    Raises:
        ConfigError: ``num_parts < 1`` or ``part_id`` outside ``0 .. num_parts - 1``.
    """
    if num_parts < 1:
        raise ConfigError(f"--num-parts {num_parts}", expected="an integer >= 1")
    if not 0 <= part_id < num_parts:
        raise ConfigError(
            f"--part-id {part_id} with --num-parts {num_parts}",
            expected=f"0 <= part-id < {num_parts}",
            hint=f"parts are numbered from 0 (a Slurm array 0-{num_parts - 1}, or a Kubernetes job's completion index)",
        )
    return cases[part_id::num_parts]
