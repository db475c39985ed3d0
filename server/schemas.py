"""Request/response bodies of the REST API (pydantic), with the examples shown in the OpenAPI page (``/docs``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class OutputFormat(StrEnum):
    """What ``predict`` and jobs return: a mask file (NIfTI, NRRD, DICOM SEG, PNG for 2D images) or label
    statistics (JSON)."""

    nifti = "nifti"
    nrrd = "nrrd"
    dicom_seg = "dicom-seg"
    json = "json"
    png = "png"


class JobState(StrEnum):
    """Life of a job: ``queued → running → done | failed``; ``cancelled`` by ``DELETE`` before it finished."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


_LABELS: list[JsonValue] = ["background", "sphere", "box"]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: what went wrong, why, how to fix it; the request id ties it to the server log."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "NotFound",
                    "detail": "no model named 'tiyn'",
                    "hint": "did you mean 'tiny'?",
                    "request_id": "3f2a9c01d4e5b6a7",
                }
            ]
        }
    )

    error: str
    detail: str
    hint: str | None = None
    request_id: str | None = None


class ModelSummary(BaseModel):
    """One served model, as listed by ``GET /v1/models``."""

    name: str
    architecture: str = Field(description="registry name of the network family")
    task: str
    in_channels: int
    label_names: list[str]


class ModelList(BaseModel):
    """``GET /v1/models``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "models": [
                        {
                            "name": "tiny",
                            "architecture": "segformer3d",
                            "task": "segmentation",
                            "in_channels": 1,
                            "label_names": _LABELS,
                        }
                    ]
                }
            ]
        }
    )

    models: list[ModelSummary]


class ModelDetail(BaseModel):
    """``GET /v1/models/{name}``: the model card and its label names."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "tiny",
                    "card": {"name": "segformer3d", "task": "segmentation", "spatial_dims": 3, "in_channels": 1},
                    "label_names": _LABELS,
                }
            ]
        }
    )

    name: str
    card: dict[str, Any]
    label_names: list[str]


class LabelVolume(BaseModel):
    value: int
    voxels: int
    volume_ml: float


class PredictStats(BaseModel):
    """``output=json``: per-label voxel counts and volumes of the predicted mask."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny",
                    "label_names": _LABELS,
                    "labels": {
                        "sphere": {"value": 1, "voxels": 1436, "volume_ml": 2.585},
                        "box": {"value": 2, "voxels": 216, "volume_ml": 0.389},
                    },
                    "shape": [32, 28, 36],
                }
            ]
        }
    )

    model: str
    label_names: list[str]
    labels: dict[str, LabelVolume]
    shape: list[int]


class JobCreated(BaseModel):
    """``POST /v1/jobs`` → 202."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d", "state": "queued"}]}
    )

    id: str
    state: JobState


class JobStatus(BaseModel):
    """``GET /v1/jobs/{id}``: state, progress (0..1), timings (ISO 8601 UTC and seconds) and the failure reason."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d",
                    "model": "tiny",
                    "state": "done",
                    "progress": 1.0,
                    "output": "nifti",
                    "tta": False,
                    "created_at": "2025-01-01T10:00:00.000Z",
                    "started_at": "2025-01-01T10:00:00.120Z",
                    "finished_at": "2025-01-01T10:00:02.480Z",
                    "queued_s": 0.12,
                    "run_s": 2.36,
                    "attempts": 1,
                    "error": None,
                    "result_url": "/v1/jobs/9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d/result",
                },
                {
                    "id": "0c5f7e2a1b6d4c8e9f0a1b2c3d4e5f60",
                    "model": "tiny",
                    "state": "failed",
                    "progress": 0.3,
                    "output": "nifti",
                    "tta": True,
                    "created_at": "2025-01-01T10:00:00.000Z",
                    "started_at": "2025-01-01T10:00:00.100Z",
                    "finished_at": "2025-01-01T10:15:00.100Z",
                    "queued_s": 0.1,
                    "run_s": 900.0,
                    "attempts": 1,
                    "error": "timed out after 900 s",
                    "result_url": None,
                },
            ]
        }
    )

    id: str
    model: str
    state: JobState
    progress: float
    output: OutputFormat
    tta: bool | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    queued_s: float | None
    run_s: float | None
    attempts: int
    error: str | None
    result_url: str | None


class JobDeleted(BaseModel):
    """``DELETE /v1/jobs/{id}``: a queued/running job is ``cancelled``; a finished one is ``deleted`` with its files."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d", "state": "cancelled"}]}
    )

    id: str
    state: str


#: ``responses=`` for routes: the error body under the statuses they can answer.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}
