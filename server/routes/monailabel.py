"""The MONAI Label protocol, so 3D Slicer's MONAILabel module works against medseg unchanged.

What that client sends and reads (see ``docs/server.md``, "MONAI Label protocol"):

* ``GET /info/``: ``name, version, labels, models{type, labels, dimension, description}, trainers, strategies,
  scoring, train_stats, datastore``. No top-level ``config``: a non-empty one makes Slicer ask for a server upgrade.
* ``POST /infer/{model}?image=ID[&session_id=]``: multipart ``params`` (JSON string: ``result_extension``,
  ``result_dtype``, ``client_id``, ...) plus an optional ``file`` part (its filename is the full local path) and an
  optional ``label`` part. The image is the uploaded file, else the datastore image ``ID``. The reply is
  ``multipart/form-data`` with a ``params`` part (JSON with ``label_names`` ``{name: value}``) and a file part
  ``image``. The client parses the raw socket, so the body is built here as bytes and always sent with
  ``Content-Length``, never chunked.
* Datastore (the "upload current volume and infer" flow): ``PUT /datastore/?image=ID``, ``GET /datastore/?output=
  all|ids|stats``, ``GET /datastore/image?image=ID``, ``PUT /datastore/label?image=ID[&tag=final]``,
  ``GET /datastore/label?label=ID[&tag=final]``.
* ``GET /auth/`` → ``{"enabled": bool}`` and ``POST /auth/token`` (form ``username``, ``password``,
  ``grant_type=password``) → ``{access_token, token_type: "bearer"}``; both open, every other route needs auth.

Prompted models (DB-SAM, SAM-UNet) are listed with type ``deepgrow``: ``params`` carries Slicer's ``foreground`` /
``background`` clicks (voxel indices ``[[i, j, k], ...]``) or medseg's ``prompts`` object; without either the
answer is 422.

Sessions, training and active learning are not offered (``trainers``/``strategies`` are empty, ``session_id`` is
ignored). Inference runs in the threadpool under the model's lock; upload size and voxel caps come from the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from monai.data import MetaTensor

import medseg
from medseg.inference.planar import source_mask
from medseg.inference.prompts import Prompts
from medseg.io import load_image, same_geometry, save_mask
from server.datastore import FINAL_TAG, STORE_SUFFIXES, Datastore, check_id, store_suffix
from server.errors import ApiError
from server.security import check_password, require_auth
from server.settings import Settings
from server.uploads import Upload, check_voxels, client_filename, open_image, receive_upload

logger = logging.getLogger("server")

#: ``result_extension`` values the reply can be written as.
RESULT_SUFFIXES: tuple[str, ...] = (".nrrd", ".nii.gz", ".nii", ".mha")
#: ``result_dtype`` values accepted (the file uses the smallest integer type that holds the labels).
RESULT_DTYPES: tuple[str, ...] = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32")

router = APIRouter(tags=["monailabel"])
_open = APIRouter()
_protected = APIRouter(dependencies=[Depends(require_auth)])


# ---- helpers ------------------------------------------------------------------------------------------------------
def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _datastore(request: Request) -> Datastore:
    store = getattr(request.app.state, "monailabel_datastore", None)
    if store is None:
        store = Datastore(_settings(request).data_dir / "datastore")
        request.app.state.monailabel_datastore = store
    return store


def _parse_params(raw: str | None) -> dict[str, Any]:
    """The ``params`` form field: a JSON object (empty when absent)."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, "BadParams", f"params is not valid JSON ({exc.msg} at char {exc.pos})", hint='send e.g. {"a": 1}'
        ) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "BadParams", f"params is a JSON {type(value).__name__}", hint="send a JSON object")
    return value


def _result_suffix(opts: dict[str, Any]) -> str:
    ext = opts.get("result_extension") or ".nii.gz"
    ext = ext.lower() if isinstance(ext, str) else ext
    if isinstance(ext, str) and not ext.startswith("."):
        ext = "." + ext
    if ext not in RESULT_SUFFIXES:
        raise ApiError(
            422, "BadParams", f"result_extension {str(ext)[:20]!r} is not supported", hint=f"one of {RESULT_SUFFIXES}"
        )
    return ext


def _check_dtype(opts: dict[str, Any], n_labels: int) -> str | None:
    dtype = opts.get("result_dtype")
    if dtype is None:
        return None
    if dtype not in RESULT_DTYPES:
        raise ApiError(422, "BadParams", f"result_dtype {str(dtype)[:20]!r} is not supported", hint=f"{RESULT_DTYPES}")
    if dtype != "float32" and np.iinfo(np.dtype(dtype)).max < n_labels - 1:
        raise ApiError(422, "BadParams", f"result_dtype {dtype} cannot hold {n_labels} labels", hint="use uint16")
    return str(dtype)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "result"


def _volume_suffix(file: UploadFile, part: str) -> str:
    """The suffix of a ``file``/``label`` part for the datastore: single-file volumes only (no DICOM zip), or 415."""
    name = client_filename(file.filename)
    suffix = store_suffix(name)
    if suffix is None:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"{part} part {name[:60]!r} is not a supported volume file",
            hint=f"send one of {', '.join(STORE_SUFFIXES)} (the file name's suffix decides)",
        )
    return suffix


def _load_stored(path: Path, settings: Settings, name: str) -> MetaTensor:
    """Load a datastore file (checked when it was uploaded) and re-check the voxel cap, which may have changed."""
    image = load_image(path)
    check_voxels(int(image.numel()), settings, name)
    image.meta["filename_or_obj"] = name
    return image


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def multipart_body(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A complete ``multipart/form-data`` body and its content type.

    Args:
        fields: name → text value (sent as ``application/json`` when it parses as JSON, else ``text/plain``).
        files: name → (file name, bytes).

    Returns:
        ``(body, content_type)``; the boundary is random and absent from every payload.
    """
    payloads = [v.encode() for v in fields.values()] + [data for _, data in files.values()]
    boundary = f"medseg-{secrets.token_hex(16)}"
    while any(boundary.encode() in p for p in payloads):
        boundary = f"medseg-{secrets.token_hex(16)}"
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'.encode()
        out += b"Content-Type: application/json\r\n\r\n" + value.encode() + b"\r\n"
    for name, (filename, data) in files.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _foreground(label_names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """``{name: value}`` of the foreground labels (value 0, the background, is left out as Slicer expects)."""
    return {name: value for value, name in enumerate(label_names) if value > 0}


# ---- auth (open) --------------------------------------------------------------------------------------------------
@_open.get("/auth/")
async def auth_info(request: Request) -> dict[str, bool]:
    """Whether the server wants a token (``POST /auth/token``) on every other call."""
    return {"enabled": _settings(request).auth_enabled}


@_open.post("/auth/token")
async def auth_token(
    request: Request,
    username: str = Form(...),
    password: str = Form(...),
    grant_type: str | None = Form(None),
) -> dict[str, Any]:
    """OAuth2 password flow: exchange a user name and password from the settings for a bearer token."""
    settings = _settings(request)
    if not settings.auth_enabled:
        raise ApiError(400, "AuthDisabled", "authentication is off on this server", hint="call the API without a token")
    if grant_type not in (None, "", "password"):
        raise ApiError(400, "UnsupportedGrantType", f"grant_type {grant_type[:20]!r}", hint="use grant_type=password")
    if not check_password(settings, username, password):
        raise ApiError(401, "Unauthorized", "wrong user name or password", headers={"WWW-Authenticate": "Bearer"})
    token = request.app.state.tokens.issue(username)
    logger.info("issued a token to %s", username)
    return {"access_token": token, "token_type": "bearer", "expires_in": settings.token_ttl_s}


def _prompts_from_params(opts: dict[str, Any]) -> Prompts | None:
    """Prompts of a prompted model from the ``params`` JSON: medseg's ``prompts`` object, or the ``foreground`` /
    ``background`` click lists ``[[i, j, k], ...]`` (voxel indices) that Slicer sends to deepgrow-type models."""
    if opts.get("prompts") is not None:
        return Prompts.from_json(opts["prompts"])
    clicks = {1: opts.get("foreground") or [], 0: opts.get("background") or []}
    if not clicks[1] and not clicks[0]:
        return None
    points = []
    for label, values in clicks.items():
        if not isinstance(values, list) or not all(isinstance(v, list) for v in values):
            raise ApiError(
                422, "BadParams", "foreground / background must be lists of [i, j, k] points", hint="[[40, 52, 12]]"
            )
        points += [[*v, label] for v in values]
    return Prompts.from_json({"space": "voxel", "points": points})


# ---- info ---------------------------------------------------------------------------------------------------------
@_protected.get("/info/")
async def info(request: Request) -> dict[str, Any]:
    """The server's models in the MONAI Label shape (no top-level ``config``)."""
    store = request.app.state.models
    models: dict[str, Any] = {}
    labels: list[str] = []
    for name in store.names():
        model = store.get(name)
        card = model.card
        fg = _foreground(model.label_names)
        labels += [n for n in fg if n not in labels]
        models[name] = {
            # Prompted models take Slicer's foreground / background clicks like MONAI Label's deepgrow models.
            "type": "deepgrow" if model.needs_prompts else "segmentation",
            "labels": fg,
            "dimension": 3,
            "description": f"{card.name} ({card.in_channels} channel(s) in, {len(fg)} label(s) out)"
            + (f"; {card.paper}" if card.paper else ""),
            "config": {"tta": model.tta_default},
        }
    return {
        "name": "medseg",
        "description": "medseg segmentation server (MONAI Label protocol)",
        "version": medseg.__version__,
        "labels": labels,
        "models": models,
        "trainers": {},
        "strategies": {},
        "scoring": {},
        "train_stats": {},
        "datastore": await run_in_threadpool(_datastore(request).stats),
    }


# ---- infer --------------------------------------------------------------------------------------------------------
@_protected.post("/infer/{model}")
async def infer(
    request: Request,
    model: str,
    image: str = Query("", description="datastore image id (used when no file part is sent)"),
    session_id: str | None = Query(None, description="accepted and ignored: sessions are not offered"),
    params: str | None = Form(None, description="JSON object: result_extension, result_dtype, client_id, tta"),
    file: UploadFile | None = File(None, description="the image; its filename may be the full local path"),
    label: UploadFile | None = File(None, description="accepted and ignored (no label-conditioned models)"),
) -> Response:
    """Segment the uploaded ``file`` (or datastore image ``image``); reply multipart ``params`` + ``image``."""
    settings = _settings(request)
    store = request.app.state.models
    segmenter = store.get(model)
    opts = _parse_params(params)
    suffix = _result_suffix(opts)
    dtype = _check_dtype(opts, len(segmenter.label_names))
    tta = opts.get("tta")
    if tta is not None and not isinstance(tta, bool):
        raise ApiError(422, "BadParams", f"tta is {type(tta).__name__}", hint="send true or false")
    prompts = _prompts_from_params(opts)
    segmenter.check_prompts(prompts)
    if image:
        check_id(image)
    datastore = _datastore(request)
    upload: Upload | None = None
    load: Callable[[], MetaTensor]
    if file is not None and file.filename:
        upload = await receive_upload(file, settings)  # size cap, accepted suffixes (incl. a DICOM zip)
        load = partial(open_image, upload, settings)
    elif image:
        load = partial(_load_stored, datastore.image_path(image), settings, image)
    else:
        raise ApiError(422, "NoImage", "neither a file part nor an image id", hint="send ?image=<id> or a file part")
    if label is not None:
        await label.close()
    if session_id:
        logger.info("infer: ignoring session_id (sessions are not offered)")

    lock = store.locks[model]

    def work() -> tuple[bytes, dict[str, Any]]:
        out = datastore.tmp_path(suffix)
        try:
            t0 = time.perf_counter()
            volume = load()
            if not lock.acquire(timeout=settings.sync_timeout_s):
                raise ApiError(503, "Busy", f"model {model!r} is busy", headers={"Retry-After": "10"})
            try:
                t1 = time.perf_counter()
                prediction = segmenter.predict(volume, tta=tta, prompts=prompts)
                t2 = time.perf_counter()
            finally:
                lock.release()
            mask, reference = prediction.mask, prediction.image
            if reference.meta.get("modality_adapter"):  # an XA / US file: the mask on its full source frames
                mask = reference = source_mask(prediction.mask, prediction.image.meta)
            save_mask(mask, reference, out)
            stats = prediction.stats_dict()
            stats["shape"] = [int(v) for v in mask.shape]  # the shape of the mask sent back
            meta = {
                "label_names": _foreground(prediction.label_names),
                "model": model,
                "image": image or None,
                "result_extension": suffix,
                "result_dtype": dtype,
                "shape": stats["shape"],
                "volumes_ml": {k: v["volume_ml"] for k, v in stats["labels"].items()},
                "latencies": {
                    "load": round(t1 - t0, 3),
                    "infer": round(t2 - t1, 3),
                    "total": round(time.perf_counter() - t0, 3),
                },
            }
            return out.read_bytes(), meta
        finally:
            out.unlink(missing_ok=True)
            if upload is not None:
                upload.cleanup()

    data, meta = await run_in_threadpool(work)
    body, content_type = multipart_body(
        {"params": json.dumps(meta)}, {"image": (f"{_safe_name(model)}-result{suffix}", data)}
    )
    logger.info("infer %s on %s: %d bytes %s", model, image or "upload", len(data), suffix)
    return Response(content=body, media_type=content_type)


# ---- datastore ----------------------------------------------------------------------------------------------------
@_protected.get("/datastore/")
async def datastore_list(request: Request, output: str = Query("stats", pattern="^(stats|all|ids)$")) -> Any:
    """``output=stats`` → ``{total, completed}``; ``all`` → every object; ``ids`` → the image ids."""
    store = _datastore(request)
    fn = {"stats": store.stats, "all": store.to_json, "ids": store.ids}[output]
    return await run_in_threadpool(fn)


@_protected.put("/datastore/")
async def datastore_upload(
    request: Request,
    image: str | None = Query(None, description="image id (default: the file's name without suffix)"),
    params: str | None = Form(None),
    file: UploadFile = File(..., description="the volume; its filename may be the full local path"),
) -> dict[str, Any]:
    """Store a volume under ``image`` (replacing an earlier one), after checking it reads as an image."""
    settings = _settings(request)
    opts = _parse_params(params)
    base = client_filename(file.filename)
    image_id = check_id(image or base[: -len(_volume_suffix(file, "file"))])
    store = _datastore(request)
    upload = await receive_upload(file, settings)

    def work() -> None:
        try:
            volume = open_image(upload, settings)
            info = {
                "name": _safe_name(base),
                "checksum": f"SHA256:{_sha256(upload.file)}",
                "shape": [int(s) for s in volume.shape],
                "client_id": str(opts.get("client_id", ""))[:64],
            }
            store.add_image(image_id, upload.file, upload.suffix, info)
        finally:
            upload.cleanup()

    await run_in_threadpool(work)
    return {"image": image_id}


@_protected.get("/datastore/image")
async def datastore_image(request: Request, image: str = Query(...)) -> FileResponse:
    """Download a stored volume."""
    path = _datastore(request).image_path(check_id(image))
    return FileResponse(path, filename=f"{_safe_name(image)}{path.name[len('image') :]}")


@_protected.put("/datastore/label")
async def datastore_label(
    request: Request,
    image: str = Query(...),
    tag: str = Query(FINAL_TAG),
    params: str | None = Form(None),
    label: UploadFile = File(...),
) -> dict[str, Any]:
    """Store a label for a stored image; it must have the image's voxel grid."""
    settings = _settings(request)
    opts = _parse_params(params)
    image_id, tag = check_id(image), check_id(tag, "tag")
    store = _datastore(request)
    image_path = store.image_path(image_id)
    _volume_suffix(label, "label")
    upload = await receive_upload(label, settings)

    def work() -> None:
        try:
            mask = open_image(upload, settings)
            volume = _load_stored(image_path, settings, image_id)
            if not same_geometry(mask, volume):
                shift = float(np.max(np.abs(mask.affine.numpy() - volume.affine.numpy())))
                raise ApiError(
                    422,
                    "GeometryMismatch",
                    f"label has shape {tuple(mask.shape[1:])} and image {image_id!r} {tuple(volume.shape[1:])}; "
                    f"their voxel-to-world affines differ by up to {shift:.3g} mm",
                    hint="export the label on the image's grid (same shape, spacing, origin and direction)",
                )
            info = {"client_id": str(opts.get("client_id", ""))[:64], "params": _small(opts)}
            store.save_label(image_id, tag, upload.file, upload.suffix, info)
        finally:
            upload.cleanup()

    await run_in_threadpool(work)
    return {"image": image_id, "label": image_id, "tag": tag}


@_protected.get("/datastore/label")
async def datastore_label_download(request: Request, label: str = Query(...), tag: str = Query(FINAL_TAG)) -> Any:
    """Download a stored label."""
    path = _datastore(request).label_path(check_id(label, "label"), tag)
    return FileResponse(path, filename=f"{_safe_name(label)}_{_safe_name(tag)}{path.name[len(tag) :]}")


def _small(opts: dict[str, Any]) -> dict[str, Any]:
    """Client params kept with a label, bounded so a client cannot fill the disk through metadata."""
    text = json.dumps(opts)
    return opts if len(text) <= 16_384 else {"truncated": True}


router.include_router(_open)
router.include_router(_protected)
