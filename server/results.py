"""Turning a :class:`medseg.inference.Prediction` into the answer a client asked for.

``nifti`` (``.nii.gz``), ``nrrd`` (``.nrrd``, what 3D Slicer loads natively), ``dicom-seg`` (``.dcm``, a BINARY SEG
referencing the uploaded series; only for DICOM input), ``png`` (label values, for one-slice 2D inputs) and ``json``
(label statistics). The files are written by the
library (:func:`medseg.io.save_mask`, :func:`medseg.io.dicom_seg.write_dicom_seg`) on the input's exact grid. Every
answer carries ``Content-Length``, ``Content-Disposition: attachment; filename=...`` and the label names as a JSON
list in ``X-Label-Names``; the json body holds them too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import FileResponse, Response

from medseg.inference import Prediction
from medseg.io import save_mask
from server.errors import ApiError
from server.schemas import OutputFormat

LABEL_HEADER = "X-Label-Names"


@dataclass(frozen=True)
class OutputKind:
    suffix: str
    media_type: str


OUTPUTS: dict[OutputFormat, OutputKind] = {
    OutputFormat.nifti: OutputKind(".nii.gz", "application/gzip"),
    OutputFormat.nrrd: OutputKind(".nrrd", "application/octet-stream"),
    OutputFormat.dicom_seg: OutputKind(".dcm", "application/dicom"),
    OutputFormat.json: OutputKind(".json", "application/json"),
    OutputFormat.png: OutputKind(".png", "image/png"),
}


def dicom_seg_refused() -> ApiError:
    return ApiError(
        422,
        "DicomSegNeedsDicom",
        "output=dicom-seg needs a DICOM input: a SEG references the source instances",
        hint="upload the series as a .zip of its DICOM files (an X-ray angiography or ultrasound image also as its "
        ".dcm file), or ask for output=nifti or nrrd",
    )


def check_output(output: OutputFormat, is_dicom: bool) -> None:
    """Refuse ``dicom-seg`` for a non-DICOM input before any work is done (422 with a hint)."""
    if output is OutputFormat.dicom_seg and not is_dicom:
        raise dicom_seg_refused()


def stats_body(prediction: Prediction, model_name: str) -> dict[str, object]:
    """The ``output=json`` body: model name, label names, per-label voxels/volumes and the mask shape."""
    return {"model": model_name, **prediction.stats_dict()}


def write_result(
    prediction: Prediction,
    output: OutputFormat,
    source: Path | None,
    path: Path,
    *,
    model_name: str,
    model_version: str,
) -> Path:
    """Write the answer for ``output`` to ``path`` (its suffix should be ``OUTPUTS[output].suffix``).

    Args:
        prediction: the mask on the input grid.
        output: format asked for.
        source: the folder holding the uploaded DICOM series, or the XA / US ``.dcm`` file (``dicom-seg`` only; None
            for other inputs).
        path: destination file.
        model_name: algorithm name written into a SEG and the json body.
        model_version: algorithm version written into a SEG.

    Raises:
        ApiError: 422 for ``dicom-seg`` without a DICOM source.
        MedsegError: the library could not write the file.
    """
    if output is OutputFormat.json:
        path.write_text(json.dumps(stats_body(prediction, model_name)))
        return path
    if output is OutputFormat.dicom_seg:
        # XA / US images (one file, read by a modality adapter) are referenced frame by frame, also from a .dcm file
        frames = bool(prediction.image.meta.get("modality_adapter")) and source is not None and source.is_file()
        if source is None or not (source.is_dir() or frames) or prediction.image.meta.get("source_format") != "dicom":
            raise dicom_seg_refused()
        from medseg.io.dicom_seg import save_dicom_seg, write_dicom_seg

        ds = write_dicom_seg(
            prediction.mask,
            source,
            list(prediction.label_names),
            algorithm_name=model_name,
            algorithm_version=model_version,
            series_uid_filter=prediction.image.meta.get("series_uid"),
        )
        return save_dicom_seg(ds, path)
    return save_mask(prediction.mask, prediction.image, path)


def result_headers(filename: str, label_names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``Content-Disposition`` and ``X-Label-Names`` (ASCII JSON, so any label name survives as a header)."""
    return {
        "Content-Disposition": f'attachment; filename="{filename}"',
        LABEL_HEADER: json.dumps(list(label_names), ensure_ascii=True),
    }


def result_filename(stem: str, output: OutputFormat) -> str:
    return f"{stem}_seg{OUTPUTS[output].suffix}" if output is not OutputFormat.json else f"{stem}_stats.json"


def render(
    prediction: Prediction,
    output: OutputFormat,
    source: Path | None,
    *,
    model_name: str,
    model_version: str = "1",
    stem: str = "image",
    workdir: Path | None = None,
) -> Response:
    """The HTTP answer for ``output``, fully in memory (so ``Content-Length`` is exact and nothing is chunked).

    Args:
        prediction: the mask on the input grid.
        output: format asked for.
        source: the uploaded DICOM series folder for ``dicom-seg``; None otherwise.
        model_name: served model name (SEG algorithm name, json body).
        model_version: ``settings.model_version``.
        stem: base of the download's file name (``<stem>_seg.nii.gz``).
        workdir: folder for the temporary file (the request's upload folder); a system temp folder if None.
    """
    kind = OUTPUTS[output]
    headers = result_headers(result_filename(stem, output), prediction.label_names)
    with tempfile.TemporaryDirectory(prefix="result-", dir=workdir) as tmp:
        path = write_result(
            prediction,
            output,
            source,
            Path(tmp) / f"result{kind.suffix}",
            model_name=model_name,
            model_version=model_version,
        )
        content = path.read_bytes()
    return Response(content=content, media_type=kind.media_type, headers=headers)


#: What ``GET /v1/jobs/{id}/result?format=`` serves of a whole-slide job: file name and media type.
SLIDE_FORMATS: dict[str, tuple[str, str]] = {
    "zip": ("result.zip", "application/zip"),
    "summary": ("summary.json", "application/json"),
    "overlay": ("overlay.png", "image/png"),
    "heatmap": ("heatmap.ome.tif", "image/tiff"),
    "tiles": ("tiles.json", "application/json"),
    "labels": ("labels.ome.tif", "image/tiff"),
    "geojson": ("contours.geojson", "application/geo+json"),
}


def job_output(model: object, name: str, output: OutputFormat | None, *, slide: bool) -> OutputFormat:
    """The stored output format of a job: a mask format as asked (default NIfTI), or ``json`` for a classifier and
    for a whole slide, whose answers are not masks on the upload's grid (422 when a mask format is asked for)."""
    task = getattr(model, "task", "segmentation")
    if not slide and task != "classification":
        return output or OutputFormat.nifti
    if output not in (None, OutputFormat.json):
        what = (
            "a whole slide's outputs (heatmap, labels, GeoJSON) are served by ?format="
            if slide
            else "it answers JSON {label, label_name, probabilities}"
        )
        raise ApiError(
            422,
            "OutputNotAvailable",
            f"output={output.value} is not available for this job: {what}",
            hint="drop `output` (or ask for output=json)" + (f"; formats: {', '.join(SLIDE_FORMATS)}" if slide else ""),
        )
    if slide:
        from medseg.data.slide_inference import predictor_tile_fn

        predictor_tile_fn(model)  # a 3D or prompted model cannot predict tiles: a 4xx now, not a failed job
    return OutputFormat.json


def slide_file_response(archive: Path, fmt: str | None, stem: str, label_names: list[str]) -> FileResponse:
    """One output of a finished whole-slide job (``fmt``: a key of :data:`SLIDE_FORMATS`, default ``zip``)."""
    fmt = fmt or "zip"
    if fmt not in SLIDE_FORMATS:
        raise ApiError(422, "UnknownFormat", f"format={fmt!r} is unknown", hint=f"one of {', '.join(SLIDE_FORMATS)}")
    name, media = SLIDE_FORMATS[fmt]
    path = archive if fmt == "zip" else archive.parent / "slide" / name
    if not path.is_file():
        present = [k for k, (n, _) in SLIDE_FORMATS.items() if (archive.parent / "slide" / n).is_file()]
        raise ApiError(
            404,
            "NotFound",
            f"this slide job has no {fmt} output",
            hint=f"available: zip, {', '.join(present)} (heatmaps for classifiers, labels and geojson for segmenters)",
        )
    suffix = name.split(".", 1)[1]
    return FileResponse(path, media_type=media, headers=result_headers(f"{stem}_slide.{suffix}", label_names))


def file_response(path: Path, output: OutputFormat, stem: str, label_names: list[str]) -> FileResponse:
    """A stored job result as a download with the same headers as :func:`render` (``Content-Length`` from the file)."""
    headers = result_headers(result_filename(stem, output), label_names)
    return FileResponse(path, media_type=OUTPUTS[output].media_type, headers=headers)
