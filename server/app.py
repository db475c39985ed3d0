"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads models and starts the job worker.

Routes (all JSON errors are ``{error, detail, hint, request_id}``):

* ``GET /healthz`` (process up), ``GET /readyz`` (models loaded, job worker alive)
* ``/v1/models``, ``/v1/models/{name}``, ``POST /v1/models/{name}/predict`` — :mod:`server.routes.predict`
* ``/v1/jobs`` — :mod:`server.routes.jobs`
* ``POST /v1/dicomweb/segment`` — :mod:`server.routes.dicomweb`
* MONAI Label protocol for 3D Slicer (``/info/``, ``/infer/{model}``, ``/datastore/``, ``/auth/``) —
  :mod:`server.routes.monailabel`
* ``GET /docs`` (Swagger UI), ``GET /redoc`` (ReDoc), ``GET /openapi.json`` — public, and working without internet:
  the pages' scripts, styles and favicon are served from the installed ``fastapi-offline`` package under
  ``/static-offline-docs/`` instead of a public CDN (a hospital network usually has no internet access)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

import medseg
from server.errors import ApiError, error_body, install_error_handlers
from server.models import ModelStore
from server.security import TokenSigner
from server.settings import Settings, load_settings
from server.uploads import BodyLimitMiddleware

logger = logging.getLogger("server")


def create_app(settings: Settings | None = None, models: ModelStore | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: server settings; ``None`` reads them from the ``MEDSEG_`` environment.
        models: preloaded models (tests); ``None`` loads ``settings.models_dir`` at start-up.
    """
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server.jobs import JobManager

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.models = models if models is not None else ModelStore.load(settings.models_dir, settings.device)
        app.state.jobs = JobManager(settings)
        app.state.jobs.start()
        try:
            yield
        finally:
            app.state.jobs.stop()

    # FastAPIOffline is FastAPI with /docs and /redoc rebuilt on local copies of Swagger UI, ReDoc and the favicon
    # (no CDN, no Google Fonts). Swagger UI's online validator is turned off too: nothing on the page points outside.
    app = FastAPIOffline(
        title="medseg",
        version=medseg.__version__,
        description="Medical image segmentation service: REST, jobs, DICOMweb, MONAI Label protocol.",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.tokens = TokenSigner.from_settings(settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)  # also caps chunked bodies
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            body = error_body(
                "PayloadTooLarge",
                f"request body of {length} bytes exceeds the limit of {settings.max_upload_bytes} bytes",
                "send a smaller file or raise max_upload_bytes in the server settings",
                request,
            )
            from fastapi.responses import JSONResponse

            return JSONResponse(body, 413, headers={"x-request-id": request.state.request_id})
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        logger.info("%s %s %s → %s", request.state.request_id, request.method, request.url.path, response.status_code)
        return response

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> dict[str, object]:
        """Models are loaded and the job worker runs."""
        jobs = getattr(request.app.state, "jobs", None)
        if jobs is None or not jobs.alive():
            raise ApiError(503, "NotReady", "the job worker is not running", headers={"Retry-After": "5"})
        return {"status": "ready", "models": request.app.state.models.names()}

    from server.routes import dicomweb, jobs, monailabel, predict

    app.include_router(predict.router)
    app.include_router(jobs.router)
    app.include_router(dicomweb.router)
    app.include_router(monailabel.router)
    return app
