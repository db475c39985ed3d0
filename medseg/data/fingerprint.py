"""The dataset fingerprint: what a training plan needs to know about a dataset, computed once and cached.

Per case: the shape and spacing (in medseg's RAS axis order, the grid training resamples from), the shape after
cropping to the non-zero box, the voxel count of every label value and the sizes of its connected objects. Per
channel: the declared modality and the intensity distribution over labelled (foreground) voxels.

The intensity statistics follow nnU-Net v2's ``DatasetFingerprintExtractor`` (``docs/planning.md``): each case is
cropped to the box of its non-zero voxels (any channel), the foreground is ``label > 0`` inside that box, and
``max_samples // n_cases`` foreground values per case and channel are drawn with replacement by
``numpy.random.RandomState(seed)`` (seed 1234, fresh per case). Mean, std (population), median, min, max and the
0.5 / 99.5 percentiles are then computed over the pooled samples, so memory stays bounded by ``max_samples`` values
per channel whatever the dataset's size. Values are drawn in the voxel order of nnU-Net's SimpleITK arrays (last
axis fastest of ``(Z, Y, X)``), so a RAS-stored dataset gives nnU-Net's own numbers; nnU-Net pools 10⁸ samples,
medseg 10⁷ by default.

The fingerprint is saved as ``medseg_fingerprint.json`` (atomic write) and reused while the dataset's image and
label files keep their paths, sizes and modification times (:func:`files_digest`) and the sampling settings match.

Examples::

    >>> from medseg.data import load_manifest
    >>> fp = load_or_compute_fingerprint(load_manifest("Task04_Hippocampus"))
    >>> fp.median_spacing, fp.channels[0].percentile_99_5
    ((1.0, 1.0, 1.0), 97812.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.core.atomic import atomic_open
from medseg.core.errors import DataError
from medseg.data.manifest import Case, Manifest, infer_modality

logger = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "CaseFingerprint",
    "ChannelStats",
    "DatasetFingerprint",
    "compute_fingerprint",
    "files_digest",
    "load_or_compute_fingerprint",
]

FINGERPRINT_FILE = "medseg_fingerprint.json"
FINGERPRINT_VERSION = 1
#: nnU-Net v2 pools 10⁸ foreground samples per channel; medseg's default keeps the pool at 40 MB per channel.
DEFAULT_MAX_SAMPLES = 10_000_000
DEFAULT_SEED = 1234  # nnU-Net's collect_foreground_intensities seed
#: At most this many object sizes (the largest) are kept per case and label.
MAX_OBJECTS_PER_CASE = 100


@dataclass(frozen=True)
class ChannelStats:
    """Foreground intensity distribution of one input channel (nnU-Net's ``foreground_intensity_properties``).

    Attributes:
        name: channel name declared by the dataset.
        modality: ``"CT"``, ``"MRI"``, ``"PET"``, ``"US"`` or ``"unknown"``.
        mean, std, median, min, max, percentile_00_5, percentile_99_5: over the pooled foreground samples
            (``nan`` when the dataset has no foreground voxel).
        n_samples: number of pooled samples.
    """

    name: str
    modality: str
    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float
    n_samples: int


@dataclass(frozen=True)
class CaseFingerprint:
    """One training case.

    Attributes:
        case_id: the case's identifier.
        shape: spatial shape ``(X, Y, Z)`` in RAS axis order (a 2D image is ``(X, Y, 1)``).
        spacing: voxel spacing in mm, same axis order.
        shape_after_crop: shape of the box of non-zero voxels (nnU-Net's ``shapes_after_crop``), same axis order.
        class_voxels: voxel count per label value (index = value).
        object_sizes: per foreground label value (as a string key), the voxel counts of its connected objects
            (face connectivity), largest first, at most :data:`MAX_OBJECTS_PER_CASE`.
    """

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    shape_after_crop: tuple[int, ...]
    class_voxels: tuple[int, ...]
    object_sizes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def relative_size_after_crop(self) -> float:
        """Share of the voxels left after cropping to the non-zero box."""
        return float(np.prod(self.shape_after_crop) / np.prod(self.shape))


@dataclass(frozen=True)
class DatasetFingerprint:
    """What :func:`compute_fingerprint` measured on a dataset.

    Attributes:
        dataset: dataset name.
        modality: the dataset's declared modality.
        label_names: label names by value (declared, or ``label_<v>`` for values found).
        channels: one :class:`ChannelStats` per input channel.
        cases: one :class:`CaseFingerprint` per training case, manifest order.
        digest: :func:`files_digest` of the files and settings the fingerprint was computed from.
        max_samples, seed: the foreground sampling settings.
        version: :data:`FINGERPRINT_VERSION`.
    """

    dataset: str
    modality: str
    label_names: tuple[str, ...]
    channels: tuple[ChannelStats, ...]
    cases: tuple[CaseFingerprint, ...]
    digest: str
    max_samples: int = DEFAULT_MAX_SAMPLES
    seed: int = DEFAULT_SEED
    version: int = FINGERPRINT_VERSION

    @property
    def spacings(self) -> np.ndarray:
        """``(N, 3)`` spacings of the cases."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes(self) -> np.ndarray:
        """``(N, 3)`` shapes after cropping to the non-zero box."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.int64)

    @property
    def median_spacing(self) -> tuple[float, ...]:
        """Median spacing per axis."""
        return tuple(float(v) for v in np.median(self.spacings, axis=0))

    @property
    def median_relative_size_after_crop(self) -> float:
        """Median share of voxels left after cropping (nnU-Net's ``median_relative_size_after_cropping``)."""
        return float(np.median([c.relative_size_after_crop for c in self.cases]))

    @property
    def class_frequencies(self) -> tuple[float, ...]:
        """Share of all training voxels carrying each label value."""
        n = max(len(self.label_names), *(len(c.class_voxels) for c in self.cases))
        total = np.zeros(n, dtype=np.float64)
        for c in self.cases:
            total[: len(c.class_voxels)] += c.class_voxels
        return tuple(float(v) for v in total / max(total.sum(), 1.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` reads it back."""
        out = asdict(self)
        out["summary"] = {
            "median_spacing": list(self.median_spacing),
            "median_shape_after_crop": [float(v) for v in np.median(self.shapes, axis=0)],
            "median_relative_size_after_crop": self.median_relative_size_after_crop,
            "class_frequencies": list(self.class_frequencies),
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetFingerprint:
        """Rebuild a fingerprint written by :meth:`to_dict`.

        Raises:
            DataError: a key is missing or has the wrong type.
        """
        try:
            return cls(
                dataset=str(data["dataset"]),
                modality=str(data["modality"]),
                label_names=tuple(data["label_names"]),
                channels=tuple(ChannelStats(**c) for c in data["channels"]),
                cases=tuple(
                    CaseFingerprint(
                        case_id=str(c["case_id"]),
                        shape=tuple(int(v) for v in c["shape"]),
                        spacing=tuple(float(v) for v in c["spacing"]),
                        shape_after_crop=tuple(int(v) for v in c["shape_after_crop"]),
                        class_voxels=tuple(int(v) for v in c["class_voxels"]),
                        object_sizes={str(k): [int(s) for s in v] for k, v in c.get("object_sizes", {}).items()},
                    )
                    for c in data["cases"]
                ),
                digest=str(data["digest"]),
                max_samples=int(data["max_samples"]),
                seed=int(data["seed"]),
                version=int(data["version"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"fingerprint data is malformed ({type(err).__name__}: {err})",
                expected="the output of DatasetFingerprint.to_dict()",
                hint=f"delete {FINGERPRINT_FILE} to compute it again",
            ) from None


# ----------------------------------------------------------------------------------------------------- digest


def _case_files(manifest: Manifest) -> list[Path]:
    files: list[Path] = []
    for case in manifest.cases:
        files.extend(case.images)
        if case.label is not None:
            files.append(case.label)
    return files


def files_digest(manifest: Manifest, *, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = DEFAULT_SEED) -> str:
    """SHA-256 over the training files (path, size, modification time), channel names and sampling settings.

    A file added, removed, rewritten or touched changes the digest, so a cached fingerprint is recomputed.

    Raises:
        DataError: a file of the manifest is missing.
    """
    entries: list[Any] = [FINGERPRINT_VERSION, max_samples, seed, list(manifest.channel_names), manifest.modality]
    for path in _case_files(manifest):
        try:
            st = path.stat()
        except OSError as err:
            raise DataError(
                f"cannot read {path}: {err}", hint="run `medseg verify-data` on the dataset", path=path
            ) from None
        try:
            rel = str(path.resolve().relative_to(manifest.root.resolve()))
        except ValueError:
            rel = str(path.resolve())
        entries.append([rel, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------- computing


def _load_case(case: Case) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Image ``(C, X, Y, Z)`` float32 and label ``(X, Y, Z)`` int, both in RAS axis order, and the RAS spacing."""
    from nibabel.orientations import apply_orientation, io_orientation

    from medseg.io import load_channels, load_image

    if case.label is None:
        raise DataError(f"case {case.case_id} has no label", expected="labelled training cases", path=case.images[0])
    if len(case.images) == 1:
        image = load_image(case.images[0], allow_external_data=True)
    else:
        image = load_channels(case.images, allow_external_data=True)
    label = load_image(case.label, allow_external_data=True)
    if tuple(label.shape[1:]) != tuple(image.shape[1:]):
        raise DataError(
            f"case {case.case_id}: label shape {tuple(label.shape[1:])} differs from image shape "
            f"{tuple(image.shape[1:])}",
            expected="a label on its image's grid",
            hint="run `medseg verify-data` on the dataset",
            path=case.label,
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    ornt = io_orientation(affine)
    spacing_file = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = float(spacing_file[axis])
    img = np.stack([apply_orientation(c, ornt) for c in image.numpy().astype(np.float32, copy=False)])
    lab = np.rint(apply_orientation(label.numpy()[0], ornt)).astype(np.int64)
    if lab.min() < 0:
        raise DataError(f"case {case.case_id}: negative label values", expected="labels 0, 1, 2, ...", path=case.label)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), tuple(spacing)


def _nonzero_box(image: np.ndarray) -> tuple[slice, ...]:
    """Box of the voxels non-zero in any channel (nnU-Net's ``crop_to_nonzero``; holes do not change a box)."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _object_sizes(label: np.ndarray) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for value in np.unique(label):
        if value == 0:
            continue
        components, n = ndimage.label(label == value)
        counts = np.bincount(components.ravel())[1:]
        sizes[str(int(value))] = sorted((int(c) for c in counts), reverse=True)[:MAX_OBJECTS_PER_CASE]
        del components
        logger.debug("label %d: %d objects", value, n)
    return sizes


def _analyse_case(case: Case, samples_per_case: int, seed: int) -> tuple[CaseFingerprint, list[np.ndarray]]:
    image, label, spacing = _load_case(case)
    box = _nonzero_box(image)
    cropped, cropped_label = image[(slice(None), *box)], label[box]
    # nnU-Net's arrays are (Z, Y, X) with X fastest: transposing the RAS (X, Y, Z) arrays visits voxels in its order.
    foreground = cropped_label.T > 0
    rs = np.random.RandomState(seed)
    samples = []
    for c in range(cropped.shape[0]):
        values = cropped[c].T[foreground]
        samples.append(rs.choice(values, samples_per_case, replace=True) if len(values) else values)
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        shape=tuple(int(n) for n in label.shape),
        spacing=spacing,
        shape_after_crop=tuple(int(s.stop - s.start) for s in box),
        class_voxels=tuple(int(v) for v in np.bincount(label.ravel())),
        object_sizes=_object_sizes(label),
    )
    return fingerprint, samples


def _channel_stats(name: str, modality: str, pooled: np.ndarray) -> ChannelStats:
    if not len(pooled):
        nan = float("nan")
        return ChannelStats(name, modality, nan, nan, nan, nan, nan, nan, nan, 0)
    p005, median, p995 = np.percentile(pooled, np.array((0.5, 50.0, 99.5)))
    return ChannelStats(
        name=name,
        modality=modality,
        mean=float(np.mean(pooled)),
        std=float(np.std(pooled)),
        median=float(median),
        min=float(np.min(pooled)),
        max=float(np.max(pooled)),
        percentile_00_5=float(p005),
        percentile_99_5=float(p995),
        n_samples=len(pooled),
    )


def channel_modalities(manifest: Manifest, n_channels: int) -> tuple[str, ...]:
    """Modality per channel: from the channel's own name, else the dataset's declared modality."""
    names = _channel_names(manifest, n_channels)
    return tuple(m if (m := infer_modality([n])) != "unknown" else manifest.modality for n in names)


def _channel_names(manifest: Manifest, n_channels: int) -> tuple[str, ...]:
    names = tuple(manifest.channel_names[:n_channels])
    return names + tuple(f"channel_{i}" for i in range(len(names), n_channels))


def compute_fingerprint(
    manifest: Manifest, *, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = DEFAULT_SEED
) -> DatasetFingerprint:
    """Measure the training cases of ``manifest`` (one case in memory at a time).

    Args:
        manifest: the dataset (:func:`medseg.data.load_manifest`).
        max_samples: foreground intensity values pooled per channel over the whole dataset.
        seed: seed of each case's sampler (nnU-Net's: 1234).

    Returns:
        The :class:`DatasetFingerprint`.

    Raises:
        DataError: the dataset has no labelled case, a file cannot be read, a label is off its image's grid, or the
            cases differ in their number of channels.
    """
    cases = [c for c in manifest.cases if c.label is not None]
    if not cases:
        raise DataError(f"{manifest.root} has no labelled case", expected="at least one image with a label")
    if max_samples < len(cases):
        raise DataError(f"max_samples {max_samples} is below the number of cases {len(cases)}", hint="raise it")
    digest = files_digest(manifest, max_samples=max_samples, seed=seed)
    samples_per_case = int(max_samples // len(cases))
    fingerprints: list[CaseFingerprint] = []
    pooled: list[list[np.ndarray]] = []
    for case in cases:
        fp, samples = _analyse_case(case, samples_per_case, seed)
        if pooled and len(samples) != len(pooled):
            raise DataError(
                f"case {case.case_id} has {len(samples)} channel(s), earlier cases {len(pooled)}",
                expected="the same channels in every case",
                path=case.images[0],
            )
        if not pooled:
            pooled = [[] for _ in samples]
        for c, s in enumerate(samples):
            pooled[c].append(s)
        fingerprints.append(fp)
    n_channels = len(pooled)
    names, modalities = _channel_names(manifest, n_channels), channel_modalities(manifest, n_channels)
    channels = tuple(_channel_stats(names[c], modalities[c], np.concatenate(pooled[c])) for c in range(n_channels))
    n_labels = max(len(manifest.label_names), *(len(f.class_voxels) for f in fingerprints))
    label_names = tuple(manifest.label_names) + tuple(f"label_{v}" for v in range(len(manifest.label_names), n_labels))
    return DatasetFingerprint(
        dataset=manifest.name,
        modality=manifest.modality,
        label_names=label_names,
        channels=channels,
        cases=tuple(fingerprints),
        digest=digest,
        max_samples=max_samples,
        seed=seed,
    )


def load_or_compute_fingerprint(
    manifest: Manifest,
    cache: str | Path | None = None,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = DEFAULT_SEED,
    recompute: bool = False,
) -> DatasetFingerprint:
    """The cached fingerprint of ``manifest`` if its files are unchanged, else a new one, saved to the cache.

    Args:
        manifest: the dataset.
        cache: the JSON file (default: :data:`FINGERPRINT_FILE` in the dataset folder). A folder that cannot be
            written to is not an error: the fingerprint is then only returned (logged as a warning).
        max_samples, seed: see :func:`compute_fingerprint`; a cache made with other settings is recomputed.
        recompute: ignore any cached file.

    Returns:
        The :class:`DatasetFingerprint`.
    """
    path = Path(cache) if cache is not None else manifest.root / FINGERPRINT_FILE
    digest = files_digest(manifest, max_samples=max_samples, seed=seed)
    if path.is_file() and not recompute:
        try:
            cached = DatasetFingerprint.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (DataError, json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
            logger.warning("ignoring unreadable fingerprint %s (%s)", path, err)
        else:
            if cached.digest == digest and cached.version == FINGERPRINT_VERSION:
                logger.info("dataset fingerprint from %s", path)
                return cached
            logger.info("dataset files changed since %s was written: computing the fingerprint again", path)
    fingerprint = compute_fingerprint(manifest, max_samples=max_samples, seed=seed)
    try:
        with atomic_open(path) as fh:
            json.dump(fingerprint.to_dict(), fh, indent=1)
    except OSError as err:
        logger.warning("could not save the dataset fingerprint to %s (%s)", path, err)
    else:
        logger.info("dataset fingerprint saved to %s", path)
    return fingerprint


def median_shape_at_spacing(fingerprint: DatasetFingerprint, spacing: Sequence[float]) -> tuple[float, ...]:
    """Median over cases of the cropped shape resampled to ``spacing`` (nnU-Net's ``new_median_shape``)."""
    shapes = fingerprint.shapes * fingerprint.spacings / np.asarray(spacing, dtype=np.float64)
    return tuple(float(v) for v in np.median(shapes, axis=0))
