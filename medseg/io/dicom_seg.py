"""DICOM Segmentation (SEG) objects for a mask predicted on a DICOM series (highdicom).

The SEG is written against the source series it was predicted from: the series is chosen and its slices are sorted
exactly as :func:`medseg.io.load_image` does (:func:`medseg.io.dicom.sorted_series_files`), so slice ``Z = k`` of
the mask is the ``k``-th sorted source instance, and ``X`` / ``Y`` are its column / row. highdicom takes frame
geometry (plane positions, orientation, pixel measures) and patient/study attributes from the source headers and
references every source instance. The SEG is BINARY - Orthanc 1.10 accepts it over both C-STORE and STOW-RS, unlike
LABELMAP - with one segment per foreground label; frames without any foreground are omitted (highdicom's default).

X-ray angiography and ultrasound images (one multi-frame or single-frame file, no Frame of Reference, no patient
position) take :func:`write_frame_seg` instead - :func:`write_dicom_seg` hands them over when the mask's meta names
a modality adapter or ``series_folder`` is the file itself: each SEG frame references the source instance and the
frame number(s) it covers, pixel for pixel. highdicom (0.28) builds SEGs of multi-frame sources only within a Frame
of Reference (plane positions), so this SEG is assembled with pydicom, from highdicom's segment descriptions.
:func:`read_dicom_seg` reads both kinds back (:func:`read_frame_seg` for the frame-referencing one).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from medseg.core.atomic import atomic_write
from medseg.core.errors import DataError, MedsegError
from medseg.io.dicom import sorted_series_files

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SEGMENT_CODE",
    "read_dicom_seg",
    "read_frame_seg",
    "save_dicom_seg",
    "write_dicom_seg",
    "write_frame_seg",
]

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


def _check_labels(labels: np.ndarray, label_names: Sequence[str]) -> None:
    """Refuse label names without a foreground label, or a mask value without a name."""
    if len(label_names) < 2:
        raise DataError(f"label_names {list(label_names)} has no foreground label", expected="background + >= 1 label")
    top = int(labels.max()) if labels.size else 0
    if top >= len(label_names):
        raise DataError(
            f"mask holds label {top} but only {len(label_names)} label names are given",
            expected=f"labels 0..{len(label_names) - 1}",
        )


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

    A mask whose meta names a modality adapter (an XA / US image, e.g. ``Prediction.mask``), or a
    ``series_folder`` that is a file, goes to :func:`write_frame_seg` (frame references, no plane positions).

    Args:
        mask: integer labels ``(X, Y, Z)`` (``MetaTensor``, tensor or array; ``(1, X, Y, Z)`` is accepted) on the
            grid of the series as :func:`medseg.io.load_image` reads it: X = column, Y = row, Z = slice in sorted
            order. A mask carrying an affine must match the series' affine (atol 1e-3 mm).
        series_folder: folder holding the source DICOM series (searched recursively, may hold other series); for
            XA / US the file or a folder holding it.
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
    mask_meta = getattr(mask, "meta", None) or {}
    if mask_meta.get("modality_adapter") or folder.is_file():
        return write_frame_seg(
            mask,
            folder,
            label_names,
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
            meta={**mask_meta, **({"series_uid": series_uid_filter} if series_uid_filter else {})},
            series_uid=series_uid,
            segment_codes=segment_codes,
        )
    labels, mask_affine = _mask_array(mask)
    _check_labels(labels, label_names)
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


def _seg_dataset(ds: pydicom.Dataset | str | Path) -> pydicom.Dataset:
    """The SEG as a dataset (read from a path), refused unless it is Segmentation Storage."""
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
    return ds


def _as_segmentation(ds: pydicom.Dataset | str | Path) -> Any:
    import highdicom as hd

    if isinstance(ds, hd.seg.Segmentation):
        return ds
    ds = _seg_dataset(ds)
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # highdicom raises ValueError/AttributeError/KeyError for malformed objects
        raise DataError(f"malformed DICOM SEG ({type(exc).__name__}: {exc})".replace("\n", " ")) from exc


def read_dicom_seg(ds: pydicom.Dataset | str | Path, series_folder: str | Path) -> np.ndarray:
    """Map a SEG back onto the voxel grid of its source series as ``load_image`` reads it.

    A SEG without a Frame of Reference (an XA / US source) is read by :func:`read_frame_seg`: labels
    ``(X, Y, N)`` on the source's frames.

    Args:
        ds: the SEG (dataset or file path), BINARY, FRACTIONAL or LABELMAP with non-overlapping segments.
        series_folder: folder holding the source series the SEG references (XA / US: the file or its folder).

    Returns:
        Labels ``(X, Y, Z)`` (uint8, uint16 for > 255 segments): segment number per voxel, 0 elsewhere, including
        the source slices whose empty frames the SEG omitted.

    Raises:
        DataError: not a SEG, the folder lacks the referenced series or some of its instances, or the SEG
            references instances outside the series.
    """
    dataset = ds if not isinstance(ds, str | Path) else _seg_dataset(ds)
    if "FrameOfReferenceUID" not in dataset:
        return read_frame_seg(dataset, series_folder)
    seg = _as_segmentation(dataset)
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


# --- SEG on an X-ray angiography / ultrasound source: frame references instead of plane positions -------------------

#: Type 2 patient and study attributes: copied from the source, written empty where it lacks them (as Type 2 allows).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_OPTIONAL_COPIED = ("IssuerOfPatientID", "PatientAge", "PatientSize", "PatientWeight", "StudyDescription")
_TEMPORAL_POSITION_INDEX = 0x00209128
_FRAME_CONTENT_SEQUENCE = 0x00209111
_REFERENCED_SEGMENT_NUMBER = 0x0062000B
_SEGMENT_IDENTIFICATION_SEQUENCE = 0x0062000A


def _frame_source_file(source: str | Path, sop_uid: str | None, series_uid: str | None) -> tuple[Path, Any]:
    """The XA / US file (and its header) that ``source`` names: the file itself, or the one in a folder whose
    SOPInstanceUID (else SeriesInstanceUID) matches, or the folder's only such file."""
    from medseg.io.modality import find_adapter, header_dataset

    path = Path(source)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise DataError(f"DICOM source {path} not found", expected="a DICOM file or a folder holding it", path=path)
    found: list[tuple[Path, Any]] = []
    for candidate in candidates:
        header = header_dataset(candidate)
        if header is None or find_adapter(header) is None:
            continue
        if sop_uid is not None and str(header.get("SOPInstanceUID", "")) != sop_uid:
            continue
        if series_uid is not None and str(header.get("SeriesInstanceUID", "")) != series_uid:
            continue
        found.append((candidate, header))
    if len(found) != 1:
        wanted = f"SOPInstanceUID {sop_uid}" if sop_uid else f"series {series_uid}" if series_uid else "any series"
        raise DataError(
            f"{path} holds {len(found)} X-ray angiography / ultrasound file(s) matching {wanted}",
            expected="exactly one XA or US DICOM file: the image the mask was predicted on",
            hint="pass the source file itself, or the folder it was loaded from",
            path=path,
        )
    return found[0]


def _source_frames(shape: tuple[int, ...], n_source: int, meta: Mapping[str, Any]) -> list[list[int]] | None:
    """Per mask frame, the 1-based source frames it was predicted on; None when the mask covers the run frame for
    frame (frame ``t`` is source frame ``t + 1``)."""
    derive = meta.get("derive")
    frames = shape[2]
    if derive == "minip" and frames == 1:  # the projection over the subtracted frames (all when none was subtracted)
        used = [int(f) for f in meta.get("subtracted_frames") or []] or list(range(1, n_source + 1))
        return [used]
    if derive == "peak" and frames == 1:
        return [[int(meta["peak_frame_number"])]]
    if frames != n_source:
        hint = (
            "a mask on a derived image needs the meta of the image it was predicted on (derive 'minip' or 'peak')"
            if frames == 1
            else "predict on the whole run (derive='series'), not on a part of it"
        )
        raise DataError(
            f"mask has {frames} frame(s) but the source holds {n_source}",
            expected=f"{n_source} frames (one per source frame) or one frame of a derived XA image",
            hint=hint,
        )
    return None


def _frames_mask(mask: Any, meta: Mapping[str, Any], columns: int, rows: int) -> np.ndarray:
    """``(X, Y, T)`` labels on the source frame grid: a mask on a cropped image is pasted back by its adapter."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataError(f"mask has shape {tuple(array.shape)}", expected="labels (X, Y, T) on the source frames")
    if array.shape[:2] != (columns, rows) and meta.get("modality_adapter"):
        from medseg.io.modality import get_adapter

        try:
            array = get_adapter(str(meta["modality_adapter"])).restore_mask(array, meta)
        except (KeyError, ValueError, MedsegError) as exc:
            raise DataError(
                f"mask of frame size {tuple(array.shape[:2])} does not fit the loaded image ({exc})",
                expected=f"(X, Y) = {(columns, rows)} (Columns, Rows) or the loaded image's grid",
                hint="write the SEG for the image the mask was predicted on",
            ) from exc
    if array.shape[:2] != (columns, rows):
        raise DataError(
            f"mask frames are {array.shape[0]} x {array.shape[1]} (X, Y)",
            expected=f"{columns} x {rows}: the source's Columns x Rows (or the cropped grid with its meta)",
            hint="predict on the source image itself; a mask of another image cannot reference its frames",
        )
    labels, _ = _mask_array(array)
    return labels


def _copy_identity(seg: pydicom.Dataset, source: pydicom.Dataset) -> None:
    for keyword in _TYPE2_COPIED:
        value = source.get(keyword)
        setattr(seg, keyword, "" if value is None else value)
    for keyword in _OPTIONAL_COPIED:
        if source.get(keyword) not in (None, ""):
            setattr(seg, keyword, source.get(keyword))
    seg.StudyInstanceUID = source.StudyInstanceUID


def _code_item(code: Any) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _derivation_item(source: pydicom.Dataset, frames: list[int], n_source: int, meta: Mapping[str, Any]) -> Any:
    """One Derivation Image Sequence item: the source instance and the frames a SEG frame was derived from."""
    from pydicom.sequence import Sequence as DicomSequence

    image = pydicom.Dataset()
    image.ReferencedSOPClassUID = source.SOPClassUID
    image.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if n_source > 1:  # required for a multi-frame instance when the reference does not cover every frame
        image.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
    image.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code_item(codes.cid7202.SourceImageForImageProcessingOperation)]
    )
    image.SpatialLocationsPreserved = "YES"
    derivation = pydicom.Dataset()
    steps = [codes.cid7203.SegmentationImageDerivation]
    if meta.get("derive") == "minip" and len(frames) > 1:
        steps.insert(0, codes.DCM.MinimumIntensityProjection)
        derivation.DerivationDescription = _lo(
            f"segmentation of the minimum-intensity projection of frames {frames[0]}-{frames[-1]}"
            f"{' after subtraction' if meta.get('subtracted') else ''}",
            1024,
        )
    elif meta.get("derive") == "peak":
        derivation.DerivationDescription = _lo(f"segmentation of frame {frames[0]} (peak opacification)", 1024)
    derivation.DerivationCodeSequence = DicomSequence([_code_item(c) for c in steps])
    derivation.SourceImageSequence = DicomSequence([image])
    return DicomSequence([derivation])


def _dimension_index(seg: pydicom.Dataset, temporal: bool) -> None:
    """Dimensions: the segment number and, for a SEG frame per source frame, the Temporal Position Index."""
    import highdicom as hd
    from pydicom.sequence import Sequence as DicomSequence

    organisation = hd.UID()
    item = pydicom.Dataset()
    item.DimensionOrganizationUID = organisation
    seg.DimensionOrganizationSequence = DicomSequence([item])
    pointers = [(_REFERENCED_SEGMENT_NUMBER, _SEGMENT_IDENTIFICATION_SEQUENCE, "Segment Number")]
    if temporal:
        pointers.append((_TEMPORAL_POSITION_INDEX, _FRAME_CONTENT_SEQUENCE, "Source Frame Number"))
    items = []
    for pointer, group, label in pointers:
        dim = pydicom.Dataset()
        dim.DimensionOrganizationUID = organisation
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = group
        dim.DimensionDescriptionLabel = label
        items.append(dim)
    seg.DimensionIndexSequence = DicomSequence(items)


def write_frame_seg(
    mask: Any,
    source: str | Path,
    label_names: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    meta: Mapping[str, Any] | None = None,
    series_uid: str | None = None,
    segment_codes: Mapping[str, tuple[str, str, str]] | None = None,
) -> pydicom.Dataset:
    """Build a BINARY DICOM SEG of a mask on an X-ray angiography or ultrasound image, frame by frame.

    XA and US images have no Frame of Reference and no patient position, so each SEG frame is tied to its source by
    its Derivation Image Sequence: the source SOP Instance and the Referenced Frame Number(s) whose pixels it covers
    one to one (Spatial Locations Preserved YES); no plane positions or pixel measures are written. The dimensions
    are the segment number and, when the mask covers the run frame for frame, the Temporal Position Index (the
    1-based source frame). A mask on a derived XA image (``derive="minip"``: the minimum-intensity projection)
    references every frame the projection was taken over (the subtracted frames), with the derivation codes
    "Minimum intensity projection" and "Segmentation"; ``derive="peak"`` references the peak frame. Frames without
    foreground are omitted (at least one frame is written).

    Args:
        mask: integer labels ``(X, Y, T)`` (``(1, X, Y, T)`` and ``(X, Y)`` accepted): on the source frame grid
            ``(Columns, Rows, NumberOfFrames)``, or on the grid of the image the adapter loaded (e.g.
            ``Prediction.mask``, cropped to the ultrasound region), which the adapter's ``restore_mask`` pastes
            back first.
        source: the XA / US DICOM file, or a folder holding it (the file is found by the meta's
            ``sop_instance_uid`` / ``series_uid``).
        label_names: names of label values ``0..N-1`` (0 is background).
        algorithm_name: name for the algorithm identification (e.g. the model name).
        algorithm_version: version for the algorithm identification.
        meta: the loaded image's meta (``modality_adapter``, ``crop_box``, ``derive``, ...); defaults to the mask's
            own meta when it is a ``MetaTensor``.
        series_uid: SeriesInstanceUID of the new SEG series (generated when None).
        segment_codes: label name -> ``(code value, scheme, meaning)``, as for :func:`write_dicom_seg`.

    Returns:
        The SEG as a ``pydicom.Dataset`` (with file meta), not yet written.

    Raises:
        DataError: no single XA / US source, a mask whose frame count or frame size differs from the source's, a
            value without a label name, or a malformed segment code.
    """
    import highdicom as hd
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = dict(meta if meta is not None else getattr(mask, "meta", None) or {})
    path, header = _frame_source_file(source, meta.get("sop_instance_uid"), meta.get("series_uid"))
    columns, rows = int(header.Columns), int(header.Rows)
    n_source = int(header.get("NumberOfFrames", 1) or 1)
    labels = _frames_mask(mask, meta, columns, rows)
    _check_labels(labels, label_names)
    derived = _source_frames(labels.shape, n_source, meta)
    references = derived if derived is not None else [[t + 1] for t in range(labels.shape[2])]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name), family=codes.DCM.ArtificialIntelligence, version=_lo(algorithm_version)
    )
    descriptions = _segment_descriptions(label_names, segment_codes, algorithm)
    planes = np.transpose(labels, (2, 1, 0))  # (X, Y, T) -> (T, rows, columns)
    chosen = [(s, t) for s in range(1, len(label_names)) for t in range(planes.shape[0]) if (planes[t] == s).any()]
    chosen = chosen or [(1, 0)]  # a SEG holds at least one frame
    seg = pydicom.Dataset()
    seg.SpecificCharacterSet = "ISO_IR 192"
    seg.SOPClassUID = _SEG_SOP_CLASS
    seg.SOPInstanceUID = hd.UID()
    _copy_identity(seg, header)
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = series_uid or hd.UID()
    seg.SeriesNumber = _SERIES_NUMBER
    seg.SeriesDescription = _lo(f"SEG {algorithm_name}")
    seg.InstanceNumber = 1
    now = datetime.datetime.now()
    seg.ContentDate, seg.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    seg.InstanceCreationDate, seg.InstanceCreationTime = seg.ContentDate, seg.ContentTime
    seg.Manufacturer = _MANUFACTURER
    seg.ManufacturerModelName = _lo(algorithm_name)
    seg.SoftwareVersions = _lo(algorithm_version)
    seg.DeviceSerialNumber = "0"
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.ContentLabel = "MEDSEG"
    seg.ContentDescription = _lo(f"{algorithm_name} {algorithm_version}")
    seg.ContentCreatorName = ""
    seg.SegmentationType = "BINARY"
    seg.SegmentSequence = DicomSequence(descriptions)
    seg.SamplesPerPixel, seg.PhotometricInterpretation = 1, "MONOCHROME2"
    seg.Rows, seg.Columns = rows, columns
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 1, 1, 0, 0
    seg.LossyImageCompression = "00"
    _dimension_index(seg, temporal=derived is None)
    seg.SharedFunctionalGroupsSequence = DicomSequence([pydicom.Dataset()])
    per_frame = []
    for segment, t in chosen:
        group = pydicom.Dataset()
        content = pydicom.Dataset()
        content.DimensionIndexValues = [segment, t + 1] if derived is None else [segment]
        if derived is None:
            content.TemporalPositionIndex = t + 1
        group.FrameContentSequence = DicomSequence([content])
        group.DerivationImageSequence = _derivation_item(header, references[t], n_source, meta)
        identification = pydicom.Dataset()
        identification.ReferencedSegmentNumber = segment
        group.SegmentIdentificationSequence = DicomSequence([identification])
        per_frame.append(group)
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    seg.NumberOfFrames = len(chosen)
    referenced = pydicom.Dataset()
    referenced.ReferencedSOPClassUID = header.SOPClassUID
    referenced.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = pydicom.Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([referenced])
    seg.ReferencedSeriesSequence = DicomSequence([series])
    bits = np.stack([planes[t] == s for s, t in chosen]).astype(np.uint8)
    seg.PixelData = pack_bits(bits.ravel(), pad=True)  # native BINARY: all frames' bits packed end to end
    seg["PixelData"].VR = "OB"
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = seg.SOPClassUID
    file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.file_meta = file_meta
    seg.preamble = b"\x00" * 128  # STOW-RS clients write the dataset as it is: make it a DICOM file (Part 10)
    logger.info(
        "DICOM SEG for %s %s: %d segments, %d frames referencing %d source frame(s)",
        meta.get("modality_adapter") or "frames of",
        path.name,
        len(descriptions),
        len(chosen),
        len({f for refs in references for f in refs}),
    )
    return seg


def _frame_references(seg: pydicom.Dataset, sop_uid: str, n_source: int) -> list[tuple[int, list[int]]]:
    """Per SEG frame: its segment number and the 0-based source frames it references."""
    out = []
    for index, group in enumerate(seg.get("PerFrameFunctionalGroupsSequence") or [], start=1):
        try:
            segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            images = [
                image
                for derivation in group.DerivationImageSequence
                for image in derivation.SourceImageSequence
                if str(image.ReferencedSOPInstanceUID) == sop_uid
            ]
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise DataError(
                f"SEG frame {index} lacks its segment number or source references ({type(exc).__name__})",
                expected="Segment Identification and Derivation Image Sequences in every per-frame group",
            ) from exc
        if not images:
            raise DataError(f"SEG frame {index} does not reference source instance {sop_uid}", expected="one source")
        frames: list[int] = []
        for image in images:
            numbers = image.get("ReferencedFrameNumber")
            if numbers in (None, ""):
                frames.extend(range(1, n_source + 1))  # no frame numbers: every frame
            else:
                frames.extend(int(v) for v in (numbers if isinstance(numbers, list | MultiValue) else [numbers]))
        bad = [f for f in frames if not 1 <= f <= n_source]
        if bad:
            raise DataError(
                f"SEG frame {index} references source frame(s) {bad}", expected=f"frames 1..{n_source} of {sop_uid}"
            )
        out.append((segment, [f - 1 for f in frames]))
    return out


def read_frame_seg(ds: pydicom.Dataset | str | Path, source: str | Path) -> np.ndarray:
    """Map a SEG written by :func:`write_frame_seg` (or any SEG with frame references) onto its XA / US source.

    Args:
        ds: the SEG (dataset or file path), BINARY or FRACTIONAL (thresholded at half) with non-overlapping segments.
        source: the source XA / US file, or a folder holding it.

    Returns:
        Labels ``(X, Y, N)`` on the source's full frame grid (``N`` = NumberOfFrames): every SEG frame is written onto
        each source frame it references (a minimum-intensity projection's mask onto every frame it was taken over);
        frames no SEG frame references are 0.

    Raises:
        DataError: not a SEG, no single source instance, references outside the source, frames of another size, or
            overlapping segments.
    """
    seg = _seg_dataset(ds)
    refs = seg.get("ReferencedSeriesSequence") or []
    instances = [str(i.ReferencedSOPInstanceUID) for r in refs for i in (r.get("ReferencedInstanceSequence") or [])]
    if len(instances) != 1:
        raise DataError(
            f"the SEG references {len(instances)} instances", expected="exactly one XA / US source instance"
        )
    _, header = _frame_source_file(source, instances[0], None)
    columns, rows = int(header.Columns), int(header.Rows)
    n_source = int(header.get("NumberOfFrames", 1) or 1)
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise DataError(
            f"SEG frames are {seg.Columns} x {seg.Rows} (columns x rows)",
            expected=f"{columns} x {rows}, the source's frame size",
        )
    references = _frame_references(seg, instances[0], n_source)
    pixels = np.asarray(seg.pixel_array)
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    if seg.get("SegmentationType") == "FRACTIONAL":
        pixels = pixels * 2 >= int(seg.get("MaximumFractionalValue", 255) or 255)
    n_segments = len(seg.get("SegmentSequence") or [])
    out = np.zeros((n_source, rows, columns), dtype=np.uint8 if n_segments < 256 else np.uint16)
    for index, (segment, frames) in enumerate(references):
        on = pixels[index] > 0
        for frame in frames:
            clash = on & (out[frame] != 0) & (out[frame] != segment)
            if clash.any():
                raise DataError(
                    f"segments {int(out[frame][clash][0])} and {segment} overlap on source frame {frame + 1}",
                    expected="non-overlapping segments (a label mask)",
                )
            out[frame][on] = segment
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))  # (frames, rows, columns) -> (X, Y, N)
