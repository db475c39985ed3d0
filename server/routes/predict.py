"""Models and synchronous prediction: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}/predict``.

``predict`` takes a multipart upload in the field ``file`` (NIfTI / NRRD / MHA, or a zip of one DICOM series) and
``output`` / ``tta`` as query or form fields. Decoding, inference and encoding run in worker threads, inference under
the model's lock (models are not re-entrant), all within ``settings.sync_timeout_s``: a request that cannot finish in
time gets 503 with a hint to use ``/v1/jobs`` (a thread cannot be killed, so an inference already started completes
in the background and then releases the lock; jobs run in a separate process with a real timeout instead).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from medseg.inference import Prediction
from medseg.inference.prompts import Prompts
from server.errors import ApiError
from server.prompts import PROMPTS_DESCRIPTION, parse_prompts
from server.results import LABEL_HEADER, OUTPUTS, check_output, render
from server.schemas import ModelDetail, ModelList, OutputFormat, PredictStats, error_responses
from server.security import require_auth
from server.settings import Settings
from server.uploads import Upload, open_image, receive_upload

logger = logging.getLogger("server")

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_auth)])

T = TypeVar("T")


def require_multipart(request: Request) -> None:
    """415 for a body that is not ``multipart/form-data`` (before field validation would answer 'field required')."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"request body is {ctype.split(';')[0] or 'missing'}, not multipart/form-data",
            hint="upload the image as a multipart form field named `file` (curl -F file=@image.nii.gz)",
        )


def pick(query: T | None, form: T | None, default: T) -> T:
    """A parameter given as a form field wins over the same one in the query string."""
    return form if form is not None else query if query is not None else default


async def in_thread(fn: Callable[[], T], deadline: float, what: str) -> T:
    """Run blocking ``fn`` in the loop's thread pool, giving up (503) at the monotonic ``deadline``."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(None, fn), max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        raise busy(what) from None


def busy(what: str) -> ApiError:
    return ApiError(
        503,
        "Timeout",
        f"{what} did not finish within the synchronous time limit",
        hint="submit large inputs as a job (POST /v1/jobs) or retry later",
        headers={"Retry-After": "10"},
    )


def _predict_locked(
    request: Request, name: str, upload: Upload, tta: bool | None, deadline: float, prompts: Prompts | None = None
) -> Prediction:
    store = request.app.state.models
    model, lock = store.get(name), store.locks[name]
    image = open_image(upload, request.app.state.settings)
    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise busy(f"waiting for model {name!r}")
    try:
        return model.predict(image, tta=tta, prompts=prompts)
    finally:
        lock.release()


def _classify_locked(request: Request, name: str, upload: Upload, deadline: float) -> dict[str, Any]:
    store = request.app.state.models
    model, lock = store.get(name), store.locks[name]
    image = open_image(upload, request.app.state.settings)
    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise busy(f"waiting for model {name!r}")
    try:
        return model.predict_class(image).to_dict()
    finally:
        lock.release()


async def _classify(
    request: Request, name: str, file: UploadFile, output: OutputFormat | None, deadline: float
) -> JSONResponse:
    """A classifier's answer: ``{"label", "label_name", "probabilities": {class: p}}`` as JSON."""
    if output not in (None, OutputFormat.json):
        raise ApiError(
            422,
            "UnsupportedOutput",
            f"model {name!r} is a classifier: it answers JSON, not {output.value}",
            hint="drop `output`, or ask for output=json",
        )
    upload = await receive_upload(file, request.app.state.settings)
    try:
        result = await in_thread(
            functools.partial(_classify_locked, request, name, upload, deadline), deadline, "classification"
        )
        logger.info(
            "%s classified %s with %s → %s",
            getattr(request.state, "request_id", "?"),
            upload.filename,
            name,
            result["label_name"],
        )
        return JSONResponse(result)
    finally:
        upload.cleanup()


@router.get("/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request) -> ModelList:
    store = request.app.state.models
    models = []
    for name in store.names():
        card = store.get(name).card
        models.append(
            {
                "name": name,
                "architecture": card.name,
                "task": card.task,
                "in_channels": card.in_channels,
                "label_names": list(store.get(name).label_names),
            }
        )
    return ModelList.model_validate({"models": models})


@router.get(
    "/models/{name}",
    response_model=ModelDetail,
    summary="A model's card and label names",
    responses=error_responses(401, 404),
)
async def get_model(name: str, request: Request) -> ModelDetail:
    return ModelDetail.model_validate(request.app.state.models.describe(name))


_FILE_RESPONSES = {
    "content": {
        OUTPUTS[OutputFormat.nifti].media_type: {},
        OUTPUTS[OutputFormat.dicom_seg].media_type: {},
        OUTPUTS[OutputFormat.png].media_type: {},
        "application/json": {"schema": PredictStats.model_json_schema()},
    },
    "description": f"the mask file (label names as a JSON list in `{LABEL_HEADER}`), or the label statistics",
}


@router.post(
    "/models/{name}/predict",
    summary="Segment one image",
    response_class=Response,
    responses={200: _FILE_RESPONSES, **error_responses(401, 404, 413, 415, 422, 503)},
    dependencies=[Depends(require_multipart)],
)
async def predict(
    name: str,
    request: Request,
    file: UploadFile = File(..., description="NIfTI/NRRD/MHA/PNG/TIFF/2D DICOM image, or a .zip of one DICOM series"),
    output_q: OutputFormat | None = Query(
        None, alias="output", description="nifti (default), nrrd, dicom-seg, json, png (2D)"
    ),
    tta_q: bool | None = Query(None, alias="tta", description="flip test-time augmentation (default: the run's)"),
    output_f: OutputFormat | None = Form(None, alias="output"),
    tta_f: bool | None = Form(None, alias="tta"),
    prompts_q: str | None = Query(None, alias="prompts", description=PROMPTS_DESCRIPTION),
    prompts_f: str | None = Form(None, alias="prompts"),
) -> Response:
    """Segment the uploaded image; the mask lands on the upload's exact voxel grid.

    Prompted models (``needs_prompts`` in their card) take a box and/or points in the JSON field ``prompts``.
    Classifiers (``task`` ``classification`` in the listing) answer JSON ``{label, label_name, probabilities}``.
    """
    settings: Settings = request.app.state.settings
    deadline = time.monotonic() + settings.sync_timeout_s
    output = pick(output_q, output_f, OutputFormat.nifti)
    tta = pick(tta_q, tta_f, None)
    model = request.app.state.models.get(name)  # 404 with a suggestion before reading the upload
    prompts = parse_prompts(pick(prompts_q, prompts_f, None))
    model.check_prompts(prompts)  # 422 in the model's own words, before the upload is read
    if model.task == "classification":
        return await _classify(request, name, file, pick(output_q, output_f, None), deadline)
    upload = await receive_upload(file, settings)
    try:
        check_output(output, upload.is_dicom or upload.suffix == ".dcm")  # a .dcm: an XA / US image (checked later)
        started = time.perf_counter()
        prediction = await in_thread(
            functools.partial(_predict_locked, request, name, upload, tta, deadline, prompts), deadline, "prediction"
        )
        encode = functools.partial(
            render,
            prediction,
            output,
            upload.folder if upload.folder is not None else upload.file if upload.suffix == ".dcm" else None,
            model_name=name,
            model_version=settings.model_version,
            stem=upload.stem,
            workdir=upload.workdir,
        )
        response = await in_thread(encode, deadline, "writing the result")
        logger.info(
            "%s predicted %s with %s → %s in %.2f s",
            getattr(request.state, "request_id", "?"),
            upload.filename,
            name,
            output.value,
            time.perf_counter() - started,
        )
        return response
    finally:
        upload.cleanup()
