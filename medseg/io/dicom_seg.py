"""DICOM Segmentation (SEG) objects for a mask predicted on a DICOM series (highdicom).

The SEG is written against the source series it was predicted from: the series is chosen and its slices are sorted
exactly as :func:`medseg.io.load_image` does (:func:`medseg.io.dicom.sorted_series_files`), so slice ``Z = k`` of
the mask is the ``k``-th sorted source instance, and ``X`` / ``Y`` are its column / row. highdicom takes frame
geometry (plane positions, orientation, pixel measures) and patient/study attributes from the source headers and
references every source instance. The SEG is BINARY - Orthanc 1.10 accepts it over both C-STORE and STOW-RS, unlike
LABELMAP - with one segment per foreground label; frames without any foreground are omitted (highdicom's default).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.sr.codedict import codes

from medseg.core.atomic import atomic_write
from medseg.core.errors import DataError
from medseg.io.dicom import sorted_series_files

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SEGMENT_CODE", "read_dicom_seg", "save_dicom_seg", "write_dicom_seg"]

#: Segmented property type used when ``segment_codes`` names no code for a label: (code, scheme, meaning).
DEFAULT_SEGMENT_CODE: tuple[str, str, str] = ("85756007", "SCT", "Tissue")
_MANUFACTURER = "medseg"
_SERIES_NUMBER = 99
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _lo(text: str, limit: int = 64) -> str:
    """A DICOM LO value: at most ``limit`` characters, no backslash (the value separator)."""
    return text.replace("\\", "/")[:limit] or "unnamed"


def _mask_array(mask: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(X, Y, Z)`` integer labels and the mask's RAS affine (None when it carries none)."""
    affine = getattr(mask, "affine", None)
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise DataError(f"mask has shape {tuple(array.shape)}", expected="a 3D label mask (X, Y, Z)")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DataError("mask holds non-integer values", expected="integer label values")
    elif array.dtype.kind not in "iub":
        raise DataError(f"mask has dtype {array.dtype}", expected="integer label values")
    if array.size and array.min() < 0:
        raise DataError(f"mask holds negative label {int(array.min())}", expected="labels >= 0")
    if affine is not None:
        affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return array.astype(np.uint16 if array.size and array.max() > 255 else np.uint8), affine


def _coded(code: tuple[str, str, str] | Any, label: str) -> Any:
    import highdicom as hd

    try:
        value, scheme, meaning = code
        return hd.sr.CodedConcept(str(value), str(scheme), _lo(str(meaning)))
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"segment code for {label!r} is {code!r}",
            expected="a (code value, coding scheme, code meaning) triple, e.g. ('85756007', 'SCT', 'Tissue')",
        ) from exc


def _segment_descriptions(
    label_names: Sequence[str],
    segment_codes: Mapping[str, tuple[str, str, str]] | None,
    algorithm: Any,
) -> list[Any]:
    import highdicom as hd

    codes_by_label = dict(segment_codes or {})
    unknown = sorted(set(codes_by_label) - set(label_names[1:]))
    if unknown:
        raise DataError(f"segment_codes names unknown labels {unknown}", expected=f"some of {list(label_names[1:])}")
    descriptions = []
    for number, name in enumerate(label_names[1:], start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_lo(str(name)),
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=_coded(codes_by_label.get(name, DEFAULT_SEGMENT_CODE), name),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def write_dicom_seg(
    mask: Any,
    series_folder: str | Path,
    label_names: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_uid: str | None = None,
    segment_codes: Mapping[str, tuple[str, str, str]] | None = None,
    series_uid_filter: str | None = None,
) -> pydicom.Dataset:
    """Build a BINARY DICOM SEG of ``mask`` referencing the DICOM series it was predicted on.

    Args:
        mask: integer labels ``(X, Y, Z)`` (``MetaTensor``, tensor or array; ``(1, X, Y, Z)`` is accepted) on the
            grid of the series as :func:`medseg.io.load_image` reads it: X = column, Y = row, Z = slice in sorted
            order. A mask carrying an affine must match the series' affine (atol 1e-3 mm).
        series_folder: folder holding the source DICOM series (searched recursively, may hold other series).
        label_names: names of label values ``0..N-1``; value 0 is background, every other value becomes segment
            ``value`` labelled with its name (also when no voxel carries it).
        algorithm_name: name for the algorithm identification (e.g. the model name).
        algorithm_version: version for the algorithm identification.
        series_uid: SeriesInstanceUID of the new SEG series (generated when None).
        segment_codes: label name -> ``(code value, scheme, meaning)`` of its segmented property type; labels not
            named use :data:`DEFAULT_SEGMENT_CODE` (SCT 85756007 "Tissue"). The category is SCT 91723000
            "Anatomical Structure".
        series_uid_filter: SeriesInstanceUID of the source series; None chooses the series as ``load_image`` does.

    Returns:
        The SEG as a ``highdicom.seg.Segmentation`` (a ``pydicom.Dataset``), not yet written.

    Raises:
        DataError: the folder holds no usable series, the mask's shape or affine does not fit it, the mask holds a
            value without a label name, or a segment code is malformed.
    """
    import highdicom as hd

    folder = Path(series_folder)
    labels, mask_affine = _mask_array(mask)
    if len(label_names) < 2:
        raise DataError(f"label_names {list(label_names)} has no foreground label", expected="background + >= 1 label")
    top = int(labels.max()) if labels.size else 0
    if top >= len(label_names):
        raise DataError(
            f"mask holds label {top} but only {len(label_names)} label names are given",
            expected=f"labels 0..{len(label_names) - 1}",
        )
    uid, paths, affine = sorted_series_files(folder, series_uid=series_uid_filter)
    sources = []
    for path in paths:
        try:
            sources.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # the headers parsed a moment ago; a file changed or vanished under us
            raise DataError(f"cannot re-read {path.name} of series {uid}", path=path) from exc
    expected = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    if labels.shape != expected:
        raise DataError(
            f"mask of shape {labels.shape} does not fit series {uid}",
            expected=f"{expected} (Columns, Rows, slices) as load_image reads the series",
            hint="write the SEG for the series the mask was predicted on (pass series_uid_filter)",
            path=folder,
        )
    if mask_affine is not None and not np.allclose(mask_affine, affine, rtol=0.0, atol=1e-3):
        diff = float(np.max(np.abs(mask_affine - affine)))
        raise DataError(
            f"mask affine differs from the affine of series {uid} by up to {diff:.3g} mm",
            expected="a mask on the series' own voxel grid (atol 1e-3 mm)",
            hint="predict on the series itself, or resample the mask onto it first",
            path=folder,
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name), family=codes.DCM.ArtificialIntelligence, version=_lo(algorithm_version)
    )
    descriptions = _segment_descriptions(label_names, segment_codes, algorithm)
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))  # (X, Y, Z) -> (frames, rows, columns)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid or hd.UID(),
            series_number=_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=_MANUFACTURER,
            manufacturer_model_name=_lo(algorithm_name),
            software_versions=_lo(algorithm_version),
            device_serial_number="0",
            content_label="MEDSEG",
            content_description=_lo(f"{algorithm_name} {algorithm_version}"),
            series_description=_lo(f"SEG {algorithm_name}"),
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom validates the source headers
        raise DataError(
            f"cannot build a DICOM SEG for series {uid} ({type(exc).__name__}: {exc})".replace("\n", " "),
            expected="source images with the attributes DICOM SEG requires (patient, study, frame of reference)",
            path=folder,
        ) from exc
    logger.info("DICOM SEG for series %s: %d segments, %d frames", uid, len(descriptions), int(seg.NumberOfFrames))
    return seg


def _as_segmentation(ds: pydicom.Dataset | str | Path) -> Any:
    import highdicom as hd

    if isinstance(ds, hd.seg.Segmentation):
        return ds
    if isinstance(ds, str | Path):
        path = ds
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise DataError(f"cannot read {Path(path).name} as DICOM", expected="a DICOM SEG file", path=path) from exc
    if str(ds.get("SOPClassUID", "")) != _SEG_SOP_CLASS:
        raise DataError(
            f"dataset has SOPClassUID {ds.get('SOPClassUID', '(none)')}",
            expected=f"a Segmentation Storage object ({_SEG_SOP_CLASS})",
        )
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # highdicom raises ValueError/AttributeError/KeyError for malformed objects
        raise DataError(f"malformed DICOM SEG ({type(exc).__name__}: {exc})".replace("\n", " ")) from exc


def read_dicom_seg(ds: pydicom.Dataset | str | Path, series_folder: str | Path) -> np.ndarray:
    """Map a SEG back onto the voxel grid of its source series as ``load_image`` reads it.

    Args:
        ds: the SEG (dataset or file path), BINARY, FRACTIONAL or LABELMAP with non-overlapping segments.
        series_folder: folder holding the source series the SEG references.

    Returns:
        Labels ``(X, Y, Z)`` (uint8, uint16 for > 255 segments): segment number per voxel, 0 elsewhere, including
        the source slices whose empty frames the SEG omitted.

    Raises:
        DataError: not a SEG, the folder lacks the referenced series or some of its instances, or the SEG
            references instances outside the series.
    """
    seg = _as_segmentation(ds)
    refs = seg.get("ReferencedSeriesSequence") or []
    if len(refs) != 1:
        raise DataError(f"the SEG references {len(refs)} series", expected="exactly one source series")
    series_uid = str(refs[0].SeriesInstanceUID)
    referenced = {str(item.ReferencedSOPInstanceUID) for item in refs[0].ReferencedInstanceSequence}
    _, paths, _ = sorted_series_files(series_folder, series_uid=series_uid)
    sops = [
        str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in paths
    ]
    missing = sorted(referenced - set(sops))
    if missing:
        raise DataError(
            f"the SEG references {len(missing)} instance(s) of series {series_uid} missing in {series_folder}",
            expected="the complete source series",
            path=series_folder,
        )
    unreferenced = [s for s in sops if s not in referenced]
    if unreferenced:  # highdicom would silently return zeros for them; say so
        logger.warning("%d source instance(s) are not referenced by the SEG; read as empty", len(unreferenced))
    n_segments = len(seg.get_segment_numbers())
    dtype = np.uint8 if n_segments < 256 else np.uint16
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sops,
            combine_segments=True,
            assert_missing_frames_are_empty=True,
            dtype=dtype,
        )
    except (ValueError, KeyError, RuntimeError) as exc:  # e.g. overlapping segments
        raise DataError(f"cannot map the SEG onto series {series_uid} ({exc})".replace("\n", " ")) from exc
    return np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)))  # (frames, rows, columns) -> (X, Y, Z)


def save_dicom_seg(ds: pydicom.Dataset, path: str | Path) -> Path:
    """Write a SEG (or any dataset) as a DICOM file, atomically; returns ``path``."""
    target = Path(path)

    def _write(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    return atomic_write(target, _write)
