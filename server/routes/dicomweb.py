"""DICOMweb pull-segment-push: ``POST /v1/dicomweb/segment``.

The PACS is named, never described, by the request: its URL and credentials come only from ``settings.pacs``, and
the request schema forbids extra fields, so a body carrying ``pacs_url`` or a password is refused with 422. The
series is found with QIDO-RS, its instances are streamed with WADO-RS into a temporary folder (counted against
``zip_max_members`` and ``max_voxels`` while they arrive), segmented under the model's lock in the threadpool, turned
into a BINARY DICOM SEG that references them (:func:`medseg.io.dicom_seg.write_dicom_seg`) and, with ``store``,
sent back with STOW-RS.

PACS failures are 502 (unreachable, refused credentials, unexpected answers) or 404 (study/series not found).
Responses and logs name the PACS by its settings key only: neither its URL nor its credentials leave the server.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from medseg.core.registry import did_you_mean
from medseg.inference.prompts import PROMPTS_JSON_EXAMPLE, Prompts
from medseg.io import load_image
from medseg.io.dicom_seg import write_dicom_seg
from server.errors import ApiError
from server.security import require_auth
from server.settings import PacsSettings, Settings

logger = logging.getLogger("server")

router = APIRouter(prefix="/v1/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_auth)])

T = TypeVar("T")
_UID = r"^[0-9]+(\.[0-9]+)*$"
_EXAMPLE_STUDY = "1.2.826.0.1.3680043.8.498.11"
_EXAMPLE_SERIES = "1.2.826.0.1.3680043.8.498.12"


class SegmentRequest(BaseModel):
    """Which series to segment, on which configured PACS, with which model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pacs": "main",
                    "study_uid": _EXAMPLE_STUDY,
                    "series_uid": _EXAMPLE_SERIES,
                    "model": "tiny",
                    "store": True,
                }
            ]
        },
    )

    pacs: str = Field(min_length=1, max_length=64, description="name of a PACS in the server settings (`pacs:`)")
    study_uid: str = Field(max_length=64, pattern=_UID, description="StudyInstanceUID")
    series_uid: str = Field(max_length=64, pattern=_UID, description="SeriesInstanceUID of the image series")
    model: str = Field(min_length=1, max_length=128, description="model name (see GET /v1/models)")
    store: bool = Field(True, description="STOW-RS the SEG back to the PACS")
    tta: bool | None = Field(None, description="override the model's flip test-time augmentation")
    prompts: dict[str, Any] | None = Field(
        None,
        description="prompted models only: boxes / points in voxel indices or RAS mm of the series, e.g. "
        + PROMPTS_JSON_EXAMPLE,
    )


class SegmentResponse(BaseModel):
    """The SEG that was built (and stored, when asked)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "seg_series_uid": "1.2.826.0.1.3680043.8.498.21",
                    "seg_sop_instance_uid": "1.2.826.0.1.3680043.8.498.22",
                    "study_uid": _EXAMPLE_STUDY,
                    "stored": True,
                    "label_names": ["background", "sphere", "box"],
                    "stats": {"labels": {"sphere": {"value": 1, "voxels": 812, "volume_ml": 1.2}}},
                }
            ]
        }
    )

    seg_series_uid: str
    seg_sop_instance_uid: str
    study_uid: str
    stored: bool
    label_names: list[str]
    stats: dict[str, Any]


def _pacs(settings: Settings, name: str) -> PacsSettings:
    if name not in settings.pacs:
        names = sorted(settings.pacs)
        hint = did_you_mean(name, names) or (f"configured PACS: {names}" if names else "no PACS is configured")
        raise ApiError(404, "UnknownPacs", f"no PACS named {name!r} in the server settings", hint=hint)
    return settings.pacs[name]


def _client(name: str, pacs: PacsSettings) -> DICOMwebClient:
    session = requests.Session()
    if pacs.username is not None:
        secret = pacs.password.get_secret_value() if pacs.password is not None else ""
        session.auth = (pacs.username, secret)
    try:
        client = DICOMwebClient(pacs.url.rstrip("/"), session=session, timeout=pacs.timeout_s)
    except ValueError:  # dicomweb-client parses the URL; its message would echo it
        raise ApiError(
            502, "PacsMisconfigured", f"PACS {name!r} has an invalid URL", hint=f"fix pacs.{name}.url in the settings"
        ) from None
    # dicomweb-client retries every failure with exponential back-off (30 s for a refused connection): keep it short.
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    return client


def _call(name: str, what: str, fn: Callable[[], T]) -> T:
    """Run one DICOMweb request, turning failures into 404/502 without echoing URLs or credentials."""
    hint_url = f"check that the PACS runs and that pacs.{name}.url in the server settings is its DICOMweb root"
    try:
        return fn()
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        logger.warning("PACS %s: %s answered HTTP %s", name, what, status)
        if status == 404:
            raise ApiError(404, "NotFound", f"{what}: not found on PACS {name!r}") from None
        if status in (401, 403):
            raise ApiError(
                502,
                "PacsAuthFailed",
                f"PACS {name!r} refused the server's credentials ({status}) for {what}",
                hint=f"check pacs.{name}.username / password in the server settings",
            ) from None
        raise ApiError(502, "PacsError", f"PACS {name!r} answered HTTP {status} to {what}", hint=hint_url) from None
    except requests.RequestException as exc:  # refused connection, DNS, timeout, TLS
        logger.warning("PACS %s unreachable during %s (%s)", name, what, type(exc).__name__)
        raise ApiError(502, "PacsUnreachable", f"PACS {name!r} is unreachable ({what})", hint=hint_url) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not a DICOMweb answer
        logger.warning("PACS %s: unexpected answer to %s (%s)", name, what, type(exc).__name__)
        raise ApiError(502, "PacsError", f"PACS {name!r} sent an unexpected answer to {what}", hint=hint_url) from None


def _retrieve(client: DICOMwebClient, body: SegmentRequest, folder: Path, settings: Settings) -> int:
    """WADO-RS the series into ``folder`` one instance at a time, within the instance and voxel caps."""
    count = voxels = 0

    def fetch() -> None:
        nonlocal count, voxels
        for ds in client.iter_series(body.study_uid, body.series_uid):
            count += 1
            voxels += (
                int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
            )
            if count > settings.zip_max_members or voxels > settings.max_voxels:
                raise ApiError(
                    413,
                    "TooManyVoxels",
                    f"series {body.series_uid} exceeds the limit of {settings.zip_max_members} instances or "
                    f"{settings.max_voxels} voxels",
                    hint="segment a smaller series or raise the limits in the server settings",
                )
            ds.save_as(folder / f"{count:06d}.dcm", enforce_file_format=True)

    _call(body.pacs, f"WADO-RS of series {body.series_uid}", fetch)
    return count


def _segment(request: Request, body: SegmentRequest) -> SegmentResponse:
    """The whole pull-segment-push, blocking (run in the threadpool)."""
    settings: Settings = request.app.state.settings
    store = request.app.state.models
    model = store.get(body.model)
    prompts = Prompts.from_json(body.prompts) if body.prompts is not None else None
    model.check_prompts(prompts)
    client = _client(body.pacs, _pacs(settings, body.pacs))
    found = _call(
        body.pacs,
        f"QIDO-RS of series {body.series_uid}",
        lambda: client.search_for_series(
            study_instance_uid=body.study_uid, search_filters={"SeriesInstanceUID": body.series_uid}
        ),
    )
    if not found:
        raise ApiError(
            404,
            "NotFound",
            f"series {body.series_uid} of study {body.study_uid} not found on PACS {body.pacs!r}",
            hint="check the StudyInstanceUID / SeriesInstanceUID (QIDO-RS /studies/{study}/series)",
        )
    with tempfile.TemporaryDirectory(prefix="medseg-dicomweb-") as tmp:
        folder = Path(tmp)
        n = _retrieve(client, body, folder, settings)
        if n == 0:
            raise ApiError(404, "NotFound", f"series {body.series_uid} on PACS {body.pacs!r} has no instances")
        image = load_image(folder, series_uid=body.series_uid)
        logger.info("PACS %s: series %s retrieved (%d instances, %s)", body.pacs, body.series_uid, n, image.shape)
        with store.locks[body.model]:
            prediction = model.predict(image, tta=body.tta, prompts=prompts)
        seg = write_dicom_seg(
            prediction.mask,
            folder,
            list(prediction.label_names),
            algorithm_name=body.model,
            algorithm_version=settings.model_version,
            series_uid_filter=body.series_uid,
        )
    if body.store:
        answer = _call(body.pacs, "STOW-RS of the SEG", lambda: client.store_instances([seg]))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            logger.warning("PACS %s refused the SEG (failure reason %s)", body.pacs, reason)
            raise ApiError(502, "PacsError", f"PACS {body.pacs!r} refused the SEG (failure reason {reason})")
        logger.info("PACS %s: stored SEG %s", body.pacs, seg.SOPInstanceUID)
    return SegmentResponse(
        seg_series_uid=str(seg.SeriesInstanceUID),
        seg_sop_instance_uid=str(seg.SOPInstanceUID),
        study_uid=str(seg.StudyInstanceUID),
        stored=body.store,
        label_names=list(prediction.label_names),
        stats=prediction.stats_dict(),
    )


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={
        404: {"description": "unknown PACS name, model, study or series"},
        413: {"description": "series over the instance or voxel limit"},
        422: {"description": "invalid body (extra fields such as pacs_url are refused)"},
        502: {"description": "PACS unreachable, refused the credentials, or answered unexpectedly"},
    },
)
async def segment(body: SegmentRequest, request: Request) -> SegmentResponse:
    """Pull a series from a configured PACS (QIDO/WADO-RS), segment it, and STOW-RS a DICOM SEG back.

    The PACS is chosen by its name in the server settings; URL and credentials never come from the request.
    """
    request.app.state.models.get(body.model)  # unknown model: 404 before touching the PACS
    _pacs(request.app.state.settings, body.pacs)
    return await run_in_threadpool(_segment, request, body)
