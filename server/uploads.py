"""Receiving an uploaded image: size cap, accepted suffixes, safe zip extraction, voxel cap, clean-up.

An upload is copied in 1 MiB chunks into a fresh folder under ``settings.data_dir/uploads`` (413 as soon as it passes
``max_upload_bytes``). Accepted: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` and ``.zip`` (one DICOM series), 2D
images, and single-file whole slides (``.svs``, ``.ndpi``, ``.scn``, ``.bif``, ``.svslide``, pyramidal ``.tif``), which
run as jobs (:func:`check_slide`); anything else is 415 naming the accepted list. A zip is extracted with
:func:`medseg.io.safe_extract_zip` (member count and size caps from the settings, no path traversal) into a folder
that is kept with the upload, because a DICOM SEG answer must reference the source instances. The header is read
and checked by :func:`medseg.io.read_header` before the pixels are decoded (413 over ``max_voxels``), so a header
claiming 10⁹ voxels, pixels in another file or more bytes than were sent costs nothing; uploads are never allowed
external data. Errors from the library keep their 4xx mapping (:mod:`server.errors`); temporary paths in their
messages are replaced by the client's file name.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile
from monai.data import MetaTensor
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medseg.core.errors import MedsegError
from medseg.io import VoxelLimitError, ZipLimits, load_image, safe_extract_zip
from server.errors import ApiError
from server.settings import Settings

logger = logging.getLogger("server")

#: Upload suffixes the REST API accepts (a zip holds one DICOM series).
ACCEPTED_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".mha",
    ".zip",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".dcm",
    ".svs",
    ".ndpi",
    ".scn",
    ".bif",
    ".svslide",
)
#: Whole-slide suffixes among them (a ``.tif`` / ``.tiff`` is a slide when it is a tiled pyramid); slides become jobs.
SLIDE_UPLOAD_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".scn", ".bif", ".svslide", ".tif", ".tiff")
_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def client_filename(raw: str | None) -> str:
    """The base name of a client-side file name (Slicer sends full local paths, with ``/`` or ``\\``)."""
    return re.split(r"[\\/]", raw or "")[-1].strip()


def upload_suffix(filename: str) -> str:
    """The accepted suffix of ``filename`` or a 415 naming the accepted ones."""
    lower = filename.lower()
    for suffix in ACCEPTED_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise ApiError(
        415,
        "UnsupportedMediaType",
        f"cannot read an upload named {filename!r}" if filename else "the upload has no file name",
        hint=f"send one of {', '.join(ACCEPTED_SUFFIXES)} (a .zip holding one DICOM series, a .dcm one 2D image)",
    )


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "PayloadTooLarge",
        f"upload exceeds the limit of {limit} bytes (received {size} so far)",
        hint="send a smaller file or raise max_upload_bytes in the server settings",
    )


@dataclass
class Upload:
    """One received upload, living in its own folder until :meth:`cleanup`.

    Attributes:
        workdir: the per-upload folder (removed by :meth:`cleanup`).
        file: the received bytes, as ``workdir/upload<suffix>``.
        filename: the client's base file name.
        suffix: one of :data:`ACCEPTED_SUFFIXES`.
        folder: the extracted DICOM series (zip uploads, after :func:`open_image`).
    """

    workdir: Path
    file: Path
    filename: str
    suffix: str
    folder: Path | None = None

    @property
    def is_dicom(self) -> bool:
        return self.suffix == ".zip"

    @property
    def is_slide(self) -> bool:
        """A whole-slide image (:func:`medseg.io.slide.is_slide_file`), predicted tile by tile in a job."""
        from medseg.io.slide import is_slide_file

        return self.suffix in SLIDE_UPLOAD_SUFFIXES and is_slide_file(self.file)

    @property
    def path(self) -> Path:
        """What :func:`medseg.io.load_image` reads: the extracted series folder or the file."""
        return self.folder if self.folder is not None else self.file

    @property
    def stem(self) -> str:
        """The client's file name without its suffix, safe for ``Content-Disposition``."""
        stem = self.filename[: len(self.filename) - len(self.suffix)] if self.filename else ""
        return _UNSAFE.sub("_", stem).strip("._")[:80] or "image"

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


async def receive_upload(file: UploadFile, settings: Settings) -> Upload:
    """Copy an ``UploadFile`` under ``settings.data_dir/uploads`` with the size cap.

    Raises:
        ApiError: 415 for an unaccepted suffix, 413 past ``max_upload_bytes``.
    """
    filename = client_filename(file.filename)
    suffix = upload_suffix(filename)
    root = settings.data_dir / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="up-", dir=root))
    upload = Upload(workdir, workdir / f"upload{suffix}", filename, suffix)
    size = 0
    try:
        with open(upload.file, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise too_large(size, settings.max_upload_bytes)
                out.write(chunk)
    except BaseException:
        upload.cleanup()
        raise
    if size == 0:
        upload.cleanup()
        raise ApiError(422, "EmptyUpload", f"{filename} is empty", hint="send the image's bytes in the `file` field")
    logger.debug("received %s (%d bytes) into %s", filename, size, workdir)
    return upload


def check_voxels(voxels: int, settings: Settings, name: str) -> None:
    """413 when ``voxels`` exceeds ``settings.max_voxels``."""
    if voxels > settings.max_voxels:
        raise ApiError(
            413,
            "TooManyVoxels",
            f"{name} has {voxels} voxels, over the limit of {settings.max_voxels}",
            hint="crop or downsample the image, or raise max_voxels in the server settings",
        )


def _scrub(err: MedsegError, upload: Upload) -> MedsegError:
    """The same error with temporary paths replaced by the client's file name (no internal paths leave the server)."""

    def clean(text: str | None) -> str | None:
        if text is None:
            return None
        for p in (upload.folder, upload.file, upload.workdir):
            if p is not None:
                text = text.replace(str(p), upload.filename).replace(p.name, upload.filename)
        return text

    return type(err)(clean(err.what) or "", expected=clean(err.expected), hint=clean(err.hint))


def open_image(upload: Upload, settings: Settings) -> MetaTensor:
    """Extract (zip), check the voxel cap and load the upload as ``MetaTensor (C, X, Y, Z)``.

    Blocking (decodes the image): call it from a worker thread. The extracted folder stays in ``upload.workdir``.

    Raises:
        ApiError: 413 over ``max_voxels``.
        MedsegError: unreadable, corrupt or refused input (mapped to 4xx by the error handlers).
    """
    try:
        if upload.is_dicom and upload.folder is None:
            limits = ZipLimits(max_members=settings.zip_max_members, max_total_bytes=settings.zip_max_total_bytes)
            upload.folder = safe_extract_zip(upload.file, upload.workdir, limits)
        # load_image checks every header claim (read_header) before decoding; never with external data
        image = load_image(upload.path, max_voxels=settings.max_voxels)
    except VoxelLimitError as err:
        check_voxels(err.voxels, settings, upload.filename)
        raise
    except MedsegError as err:
        raise _scrub(err, upload) from None
    check_voxels(int(math.prod(image.shape)), settings, upload.filename)
    image.meta["filename_or_obj"] = upload.filename
    return image


def check_slide(upload: Upload, slide_mpp: float | None) -> None:
    """Open an uploaded slide once (format, pyramid, microns per pixel) so that a bad slide is a 4xx, not a failed job.

    Raises:
        ApiError: 422 when the slide does not say its microns per pixel and ``slide_mpp`` is not given.
        MedsegError: an unreadable or truncated slide (mapped to 4xx).
    """
    from medseg.io.slide import MissingMppError, open_slide

    try:
        with open_slide(upload.file, mpp=slide_mpp):
            pass
    except MissingMppError as err:
        raise ApiError(
            422,
            "SlideMppMissing",
            f"{upload.filename} does not say how many microns a pixel spans",
            hint="send slide_mpp (level-0 microns per pixel: about 0.25 at 40x, 0.5 at 20x) with the job",
        ) from err
    except MedsegError as err:
        raise _scrub(err, upload) from None


class BodyLimitMiddleware:
    """ASGI middleware: 413 once a request body passes ``max_bytes``, also for chunked bodies without Content-Length.

    ``create_app`` refuses a declared ``Content-Length`` over the cap; this counts the bytes that actually arrive, so
    a chunked upload cannot fill the disk through the multipart parser's spool files. When the cap is passed the
    body read fails, and whatever response the application makes of that is replaced by the 413 JSON body. Add it
    with ``app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        exceeded = False
        answered = False

        async def counted() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise too_large(received, self.max_bytes)
            return message

        async def answer() -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            err = too_large(received, self.max_bytes)
            body = json.dumps({"error": err.error, "detail": err.detail, "hint": err.hint, "request_id": None})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})

        async def guarded(message: Message) -> None:
            if exceeded:  # the app's answer to the failed read is replaced by the 413
                await answer()
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
            await answer()
