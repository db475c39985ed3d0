"""Asynchronous jobs: ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/result``, ``DELETE /v1/jobs/{id}``.

``POST`` takes the inputs of ``predict`` plus the model name (form or query field ``model``). The upload is checked
before the job is accepted (suffix, size, zip safety, voxel cap, readable image, channel count), so an accepted job
fails only for a real fault or its timeout. The job runs in the worker process of :class:`server.jobs.JobManager`.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from server.errors import ApiError
from server.jobs import JobManager
from server.prompts import PROMPTS_DESCRIPTION, parse_prompts
from server.results import (
    LABEL_HEADER,
    SLIDE_FORMATS,
    check_output,
    file_response,
    job_output,
    slide_file_response,
)
from server.routes.predict import pick, require_multipart
from server.schemas import JobCreated, JobDeleted, JobStatus, OutputFormat, error_responses
from server.security import require_auth
from server.settings import Settings
from server.uploads import check_slide, open_image, receive_upload

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_auth)])

JobId = Path(..., pattern=r"^[0-9a-f]{32}$", description="the id returned by POST /v1/jobs")


def _jobs(request: Request) -> JobManager:
    return request.app.state.jobs


@router.post(
    "",
    status_code=202,
    response_model=JobCreated,
    summary="Queue a segmentation job",
    responses=error_responses(401, 404, 413, 415, 422, 503),
    dependencies=[Depends(require_multipart)],
)
async def create_job(
    request: Request,
    file: UploadFile = File(..., description="NIfTI/NRRD/MHA image, or a .zip of one DICOM series"),
    model_f: str | None = Form(None, alias="model", description="served model name"),
    output_f: OutputFormat | None = Form(None, alias="output"),
    tta_f: bool | None = Form(None, alias="tta"),
    model_q: str | None = Query(None, alias="model"),
    output_q: OutputFormat | None = Query(
        None, alias="output", description="nifti (default), nrrd, dicom-seg, json, png (2D)"
    ),
    tta_q: bool | None = Query(None, alias="tta"),
    prompts_f: str | None = Form(None, alias="prompts", description=PROMPTS_DESCRIPTION),
    prompts_q: str | None = Query(None, alias="prompts"),
    mpp_f: float | None = Form(None, alias="mpp", gt=0, description="whole slides: microns per pixel of the tiles"),
    mpp_q: float | None = Query(None, alias="mpp", gt=0),
    slide_mpp_f: float | None = Form(
        None, alias="slide_mpp", gt=0, description="whole slides: level-0 microns per pixel when the file has none"
    ),
    slide_mpp_q: float | None = Query(None, alias="slide_mpp", gt=0),
) -> JSONResponse:
    """Accept a job (202 + id); poll ``GET /v1/jobs/{id}``, then fetch ``/result``. 503 + Retry-After when full.

    A whole slide (``.svs``, ``.ndpi``, ``.scn``, pyramidal ``.tif``, ...) is predicted tile by tile; its result is a
    zip of the slide outputs, or one of them with ``?format=``. A classifier's job answers
    ``{label, label_name, probabilities}``."""
    settings: Settings = request.app.state.settings
    name = pick(model_q, model_f, None)
    if not name:
        raise ApiError(422, "ValidationError", "the field `model` is missing", hint="add -F model=<name>")
    output_given = pick(output_q, output_f, None)
    tta = pick(tta_q, tta_f, None)
    store = request.app.state.models
    model = store.get(name)
    prompts = parse_prompts(pick(prompts_q, prompts_f, None))
    model.check_prompts(prompts)
    jobs = _jobs(request)
    jobs.check_capacity()
    upload = await receive_upload(file, settings)
    try:
        slide = None
        if upload.is_slide:  # tile by tile in the job; only the slide's format and pixel size are checked now
            output = job_output(model, name, output_given, slide=True)
            slide_mpp = pick(slide_mpp_q, slide_mpp_f, None)
            await run_in_threadpool(check_slide, upload, slide_mpp)
            slide = {"target_mpp": pick(mpp_q, mpp_f, None), "slide_mpp": slide_mpp}
        else:
            output = job_output(model, name, output_given, slide=False)
            check_output(output, upload.is_dicom or upload.suffix == ".dcm")  # a .dcm: an XA / US image
            image = await run_in_threadpool(open_image, upload, settings)
            model.check_input(image, prompts)  # channels, dimensions, prompts inside the image: fail now
            del image
        job_id = await run_in_threadpool(
            functools.partial(
                jobs.submit,
                name,
                upload.path,
                output,
                tta,
                model_dir=store.source.get(name),
                stem=upload.stem,
                prompts=prompts.to_json() if prompts is not None else None,
                slide=slide,
            )
        )
    finally:
        upload.cleanup()
    body = JobCreated(id=job_id, state="queued").model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get(
    "/{job_id}",
    response_model=JobStatus,
    summary="State, progress and timings of a job",
    responses=error_responses(401, 404),
)
async def get_job(request: Request, job_id: str = JobId) -> JobStatus:
    return JobStatus.model_validate(_jobs(request).get(job_id).status())


@router.get(
    "/{job_id}/result",
    summary="The result of a finished job",
    response_class=FileResponse,
    responses={
        200: {"description": f"the mask file or json statistics; label names in `{LABEL_HEADER}`"},
        **error_responses(401, 404, 409),
    },
)
async def get_result(
    request: Request,
    job_id: str = JobId,
    fmt: str | None = Query(
        None, alias="format", description=f"whole-slide jobs: one of {', '.join(SLIDE_FORMATS)} (default zip)"
    ),
) -> FileResponse:
    jobs = _jobs(request)
    path = jobs.result_path(job_id)
    job = jobs.get(job_id)
    if not path.is_file():
        raise ApiError(409, "ResultMissing", f"the result of job {job_id} is gone", hint="submit the job again")
    if path.suffix == ".zip":  # a whole-slide job
        return slide_file_response(path, fmt, job.stem, job.labels)
    if fmt is not None:
        raise ApiError(422, "UnknownFormat", "format= applies to whole-slide jobs", hint="drop format")
    return file_response(path, OutputFormat(job.output), job.stem, job.labels)


@router.delete(
    "/{job_id}",
    response_model=JobDeleted,
    summary="Cancel a job, or delete a finished one",
    responses=error_responses(401, 404, 409),
)
async def delete_job(request: Request, job_id: str = JobId) -> JobDeleted:
    state = await run_in_threadpool(_jobs(request).cancel, job_id)
    return JobDeleted(id=job_id, state=state)
