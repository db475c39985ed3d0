"""Every error leaves the server as ``{error, detail, hint}`` JSON with a 4xx status (5xx only for real faults).

No traceback or internal path is ever put in a response; the request id ties a response to the server log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medseg.core.errors import ConfigError, DataError, MedsegError, ModelInputError, WeightsError

logger = logging.getLogger("server")

STATUS = {DataError: 422, ModelInputError: 422, ConfigError: 400, WeightsError: 500}


class ApiError(Exception):
    """An HTTP error with the house body; raise it from routes."""

    def __init__(
        self, status: int, error: str, detail: str, hint: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.hint, self.headers = status, error, detail, hint, headers


def error_body(error: str, detail: str, hint: str | None, request: Request) -> dict[str, str | None]:
    return {"error": error, "detail": detail, "hint": hint, "request_id": getattr(request.state, "request_id", None)}


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document tell the truth about errors: every 4xx/5xx body is an ``ErrorBody``.

    FastAPI documents request validation failures as its own ``HTTPValidationError`` (``detail`` a list), but the
    handlers below answer them as ``ErrorBody`` (``detail`` a string); and any route can answer 401 (auth), 413
    (body size) or another 4xx from the library. Every operation therefore gets ``4XX`` -> ``ErrorBody`` next to
    the statuses it declares, and declared error statuses point at ``ErrorBody``.
    """
    from server.schemas import ErrorBody

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
    error = {
        "description": "error: {error, detail, hint, request_id}",
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue  # path-level parameters, not an operation
            responses = operation["responses"]
            for status, response in responses.items():
                if str(status)[0] in "45":
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}
            responses.setdefault("4XX", error)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_error_handlers(app: FastAPI) -> None:
    """Map ``ApiError``, ``MedsegError``, validation errors and anything unexpected to JSON bodies.

    Also makes ``app.openapi()`` document those bodies (:func:`document_errors`).
    """
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(build_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.error, exc.detail, exc.hint, request), exc.status, headers=exc.headers)

    @app.exception_handler(MedsegError)
    async def _medseg(request: Request, exc: MedsegError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        body = exc.to_dict()
        return JSONResponse(error_body(body["error"] or "error", body["detail"] or "", body["hint"], request), status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body("ValidationError", problems, "see /docs for the expected request", request), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body("HTTPError", str(exc.detail), None, request), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in request %s", getattr(request.state, "request_id", "?"))
        return JSONResponse(
            error_body("InternalError", "the server failed to handle this request", "see the server log", request),
            500,
        )
