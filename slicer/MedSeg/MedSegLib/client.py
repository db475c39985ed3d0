"""A typed client for the medseg REST server, written with the Python standard library only.

3D Slicer ships its own Python (3.9 in older releases, 3.12 in current ones) and the module must not need packages
beyond it, so this file uses ``urllib.request``, ``json`` and ``ssl`` and builds multipart bodies by hand
(:func:`encode_multipart`); it never imports ``cgi`` (removed in Python 3.13), ``requests``, numpy or torch.

What it speaks (the server's ``/v1`` API):

* ``GET /readyz`` (open) and ``GET /v1/models``, ``GET /v1/models/{name}`` (cards and label names);
* ``POST /v1/models/{name}/predict`` with a multipart ``file`` and ``output`` (``nrrd`` by default: what Slicer loads
  natively; ``json`` for label statistics); the label names come back in the ``X-Label-Names`` header;
* jobs: ``POST /v1/jobs``, ``GET /v1/jobs/{id}`` (state, progress 0..1), ``GET /v1/jobs/{id}/result``,
  ``DELETE /v1/jobs/{id}`` (cancel);
* prompts for prompted models as the JSON field ``prompts`` (``{"space": "ras", "boxes": [...], "points": [...]}``,
  RAS millimetres; see :mod:`MedSegLib.scene` for building it from Markups);
* auth: an API key sent as ``X-API-Key``, or a bearer token from ``POST /auth/token`` (user name and password).

Every failure raises :class:`MedSegServerError` carrying the server's ``{error, detail, hint}`` body and the HTTP
status (``None`` when the server could not be reached). The API key and tokens are never logged or shown in
``repr``.

Example::

    client = MedSegClient("https://medseg.example.org", api_key="...")
    model = client.get_model("brain")
    result = client.predict("brain", "/tmp/volume.nrrd")
    result.save("/tmp/volume_seg.nrrd"); result.label_names  # ['background', 'gm', 'wm']
"""

from __future__ import annotations

import json
import logging
import mimetypes
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "JobStatus",
    "MedSegClient",
    "MedSegServerError",
    "ModelInfo",
    "Result",
    "encode_multipart",
]

LABEL_HEADER = "X-Label-Names"
OUTPUTS = ("nifti", "nrrd", "dicom-seg", "json", "png")
FINAL_STATES = ("done", "failed", "cancelled")


class MedSegServerError(Exception):
    """A call that failed: the server's error body, or a transport failure (``status`` None).

    Attributes:
        status: HTTP status, or None when no answer came (connection refused, timeout, TLS failure).
        error: short error name (``Unauthorized``, ``NotFound``, ``ModelInputError``, ``ConnectionError``, ...).
        detail: what was wrong.
        hint: how to fix it (may be None).
        request_id: the server's request id, which ties the answer to the server log (may be None).
    """

    def __init__(
        self, status: int | None, error: str, detail: str, hint: str | None = None, request_id: str | None = None
    ) -> None:
        self.status, self.error, self.detail, self.hint, self.request_id = status, error, detail, hint, request_id
        super().__init__(self.message())

    def message(self) -> str:
        """One readable paragraph for a user: status and error name, the detail and the hint."""
        head = f"{self.error} (HTTP {self.status})" if self.status is not None else self.error
        text = f"{head}: {self.detail}"
        if self.hint:
            text += f"\nHint: {self.hint}"
        return text


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its name, card (``task``, ``spatial_dims``, ``in_channels``, ``needs_prompts``, ...) and labels.

    ``GET /v1/models`` returns summaries (``card`` then holds ``architecture``, ``task``, ``in_channels``);
    ``GET /v1/models/{name}`` the full card.
    """

    name: str
    label_names: tuple[str, ...]
    card: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_prompts(self) -> bool:
        """Whether predict needs a box and/or points (prompted models)."""
        return bool(self.card.get("needs_prompts", False))

    @property
    def task(self) -> str:
        return str(self.card.get("task", "segmentation"))

    def describe(self) -> str:
        """A short multi-line text of the card for display."""
        card = dict(self.card)
        card.setdefault("architecture", card.get("name"))  # the full card names the network family `name`
        keys = ("architecture", "task", "spatial_dims", "in_channels", "roi_size", "target_spacing", "paper")
        lines = [f"{k}: {card[k]}" for k in keys if card.get(k) not in (None, "", [], ())]
        lines.append("labels: " + ", ".join(self.label_names[1:] if len(self.label_names) > 1 else self.label_names))
        if self.needs_prompts:
            lines.append("needs prompts: a box (ROI) and/or points")
        return "\n".join(lines)


@dataclass(frozen=True)
class Result:
    """A downloaded result: the file's bytes, its media type, suggested file name and the label names.

    ``label_names[v]`` names label value ``v`` of the mask (``label_names[0]`` is the background).
    """

    content: bytes
    content_type: str
    filename: str
    label_names: tuple[str, ...]

    def save(self, path: str | Path) -> Path:
        """Write the bytes to ``path`` and return it."""
        path = Path(path)
        path.write_bytes(self.content)
        return path

    def json(self) -> Any:
        """The body parsed as JSON (``output=json`` statistics)."""
        return json.loads(self.content.decode("utf-8"))


@dataclass(frozen=True)
class JobStatus:
    """``GET /v1/jobs/{id}``: ``state`` is ``queued | running | done | failed | cancelled``, ``progress`` 0..1."""

    id: str
    state: str
    progress: float
    model: str = ""
    error: str | None = None
    result_url: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobStatus:
        return cls(
            id=str(body["id"]),
            state=str(body["state"]),
            progress=float(body.get("progress") or 0.0),
            model=str(body.get("model", "")),
            error=body.get("error"),
            result_url=body.get("result_url"),
            raw=dict(body),
        )


def encode_multipart(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes]], boundary: str | None = None
) -> tuple[str, bytes]:
    """A ``multipart/form-data`` body (RFC 7578) and its ``Content-Type``.

    Args:
        fields: form field name -> text value.
        files: form field name -> ``(file name, bytes)``; only the base name of the file name is sent.
        boundary: the part boundary (a random one if None); must not occur in any value.

    Returns:
        ``(content_type, body)``.
    """
    boundary = boundary or f"medseg-{uuid.uuid4().hex}"
    marker = f"--{boundary}".encode("ascii")
    body = bytearray()

    def quoted(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")

    for name, value in fields.items():
        body += marker + b"\r\n"
        body += f'Content-Disposition: form-data; name="{quoted(name)}"\r\n\r\n'.encode()
        body += value.encode("utf-8") + b"\r\n"
    for name, (filename, data) in files.items():
        if marker in data:
            raise ValueError("the multipart boundary occurs inside a file; use another boundary")
        base = Path(filename).name
        ctype = mimetypes.guess_type(base)[0] or "application/octet-stream"
        body += marker + b"\r\n"
        body += f'Content-Disposition: form-data; name="{quoted(name)}"; filename="{quoted(base)}"\r\n'.encode()
        body += f"Content-Type: {ctype}\r\n\r\n".encode()
        body += data + b"\r\n"
    body += marker + b"--\r\n"
    return f"multipart/form-data; boundary={boundary}", bytes(body)


def _error_from_body(status: int, body: bytes, url: str) -> MedSegServerError:
    """The server's ``{error, detail, hint}``; a readable stand-in when the body is not that (wrong server)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict) and "error" in data and "detail" in data:
        return MedSegServerError(
            status, str(data["error"]), str(data["detail"]), data.get("hint"), data.get("request_id")
        )
    return MedSegServerError(
        status,
        "UnexpectedAnswer",
        f"{url} answered HTTP {status} without a medseg error body",
        hint="check that the server URL points at a medseg server (e.g. http://host:8000, no path)",
    )


class MedSegClient:
    """Calls to one medseg server.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/`` is ignored).
        api_key: an API key from the server settings, sent as ``X-API-Key``; or None.
        token: a bearer token (from :meth:`login`); or None.
        timeout_s: seconds to wait for the server on each call (connect and each read).
        verify_tls: check the server's TLS certificate and host name (on by default; turn off only for a test
            server with a self-signed certificate, better pass ``ca_file``).
        ca_file: a PEM file of certificate authorities to trust in addition to the system ones.

    Raises:
        ValueError: ``url`` is not an http(s) URL.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        verify_tls: bool = True,
        ca_file: str | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"server URL {url!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8000")
        self.url = url.strip().rstrip("/")
        self.timeout_s = float(timeout_s)
        self._api_key = api_key or None
        self._token = token or None
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context: ssl.SSLContext | None = context
        else:
            self._context = None
            host = (parts.hostname or "").lower()
            if (api_key or token) and host not in ("localhost", "127.0.0.1", "::1"):
                logger.warning(
                    "credentials for %s travel unencrypted over http; use an https URL for a server on another host",
                    host,
                )

    def __repr__(self) -> str:
        auth = "api key" if self._api_key else "token" if self._token else "no credentials"
        return f"MedSegClient({self.url!r}, {auth})"

    # -- transport -------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, */*"}
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        elif self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP call; returns ``(status, headers with lower-case names, body)`` for a 2xx answer.

        Raises:
            MedSegServerError: a 4xx/5xx answer (with the server's body), or no answer at all.
        """
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type or "application/octet-stream"
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        started = time.monotonic()
        try:
            # The scheme is checked in __init__: only http(s) URLs are opened.
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s, context=self._context) as response:
                data = response.read()
                status = response.status
                answer = {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            data = exc.read() if exc.fp is not None else b""
            raise _error_from_body(exc.code, data, url) from None
        except urllib.error.URLError as exc:
            raise self._transport_error(exc.reason) from None
        except (TimeoutError, OSError) as exc:  # socket.timeout is not a TimeoutError before Python 3.10
            raise self._transport_error(exc) from None
        logger.debug("%s %s -> %d in %.2f s", method, path, status, time.monotonic() - started)
        return status, answer, data

    def _transport_error(self, reason: object) -> MedSegServerError:
        text = str(reason)
        if isinstance(reason, ssl.SSLError) or "CERTIFICATE" in text.upper():
            return MedSegServerError(
                None,
                "TLSError",
                f"the TLS connection to {self.url} failed: {text}",
                hint="give the server's CA certificate (ca_file), or fix the server certificate",
            )
        if isinstance(reason, TimeoutError) or "timed out" in text.lower():
            return MedSegServerError(
                None,
                "Timeout",
                f"{self.url} did not answer within {self.timeout_s:g} s",
                hint="check the server is running and reachable; large inputs go through jobs",
            )
        return MedSegServerError(
            None,
            "ConnectionError",
            f"cannot reach {self.url}: {text}",
            hint="check the server URL and port, and that `medseg serve` is running",
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        _, _, data = self.request(method, path, **kwargs)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MedSegServerError(
                None,
                "UnexpectedAnswer",
                f"{self.url}{path} did not answer JSON",
                hint="check that the server URL points at a medseg server",
            ) from None

    # -- auth and health -------------------------------------------------------------------------------------------

    def login(self, username: str, password: str) -> str:
        """Exchange a user name and password (server setting ``users``) for a bearer token used from now on.

        Raises:
            MedSegServerError: 401 for a wrong pair, 400 when the server has auth off.
        """
        form = urllib.parse.urlencode({"username": username, "password": password, "grant_type": "password"})
        body = self._json(
            "POST", "/auth/token", body=form.encode("ascii"), content_type="application/x-www-form-urlencoded"
        )
        self._token = str(body["access_token"])
        self._api_key = None
        return self._token

    @property
    def has_credentials(self) -> bool:
        return bool(self._api_key or self._token)

    def ready(self) -> dict[str, Any]:
        """``GET /readyz`` (needs no credentials): ``{"status": "ready", "models": [...]}``."""
        return dict(self._json("GET", "/readyz"))

    def test_connection(self) -> list[ModelInfo]:
        """Check the server answers, is ready and accepts the credentials; returns the model list.

        Raises:
            MedSegServerError: with a message that says which of those failed.
        """
        try:
            self.ready()
        except MedSegServerError as exc:
            if exc.status == 404:
                raise MedSegServerError(
                    404,
                    "NotMedSeg",
                    f"{self.url} has no /readyz",
                    hint="check that the URL points at a medseg server (`medseg serve`), not another service",
                ) from None
            raise
        return self.list_models()

    # -- models and prediction -------------------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """``GET /v1/models``: every served model with its label names and a summary card."""
        body = self._json("GET", "/v1/models")
        return [
            ModelInfo(str(m["name"]), tuple(m.get("label_names", ())), {k: v for k, v in m.items() if k != "name"})
            for m in body.get("models", [])
        ]

    def get_model(self, name: str) -> ModelInfo:
        """``GET /v1/models/{name}``: the full card (``needs_prompts`` included). 404 names the closest model."""
        body = self._json("GET", f"/v1/models/{urllib.parse.quote(name, safe='')}")
        return ModelInfo(str(body["name"]), tuple(body.get("label_names", ())), dict(body.get("card", {})))

    @staticmethod
    def _form(
        image: str | Path | tuple[str, bytes],
        output: str,
        prompts: Mapping[str, Any] | None,
        tta: bool | None,
        model: str | None = None,
    ) -> tuple[str, bytes]:
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} is not one of {', '.join(OUTPUTS)}")
        if isinstance(image, tuple):
            filename, data = image
        else:
            filename, data = Path(image).name, Path(image).read_bytes()
        fields = {"output": output}
        if model is not None:
            fields["model"] = model
        if prompts is not None:
            fields["prompts"] = json.dumps(prompts)
        if tta is not None:
            fields["tta"] = "true" if tta else "false"
        return encode_multipart(fields, {"file": (filename, data)})

    @staticmethod
    def _result(headers: Mapping[str, str], data: bytes) -> Result:
        try:
            labels = tuple(json.loads(headers.get(LABEL_HEADER.lower(), "[]")))
        except ValueError:
            labels = ()
        disposition = headers.get("content-disposition", "")
        filename = disposition.split("filename=", 1)[1].strip('"; ') if "filename=" in disposition else "result"
        return Result(data, headers.get("content-type", "application/octet-stream"), filename, labels)

    def predict(
        self,
        model: str,
        image: str | Path | tuple[str, bytes],
        *,
        output: str = "nrrd",
        prompts: Mapping[str, Any] | None = None,
        tta: bool | None = None,
        timeout_s: float | None = None,
    ) -> Result:
        """Segment one image synchronously (small inputs; a 503 ``Timeout`` says to use :meth:`submit_job`).

        Args:
            model: served model name.
            image: a NRRD / NIfTI / MHA file path, or ``(file name, bytes)``.
            output: ``nrrd`` (default), ``nifti``, ``json`` (statistics), ``dicom-seg`` or ``png``.
            prompts: the prompt JSON for prompted models (e.g. from :func:`MedSegLib.scene.prompts_json`).
            tta: flip test-time augmentation; None keeps the model's default.
            timeout_s: read timeout of this call (default: the client's).

        Returns:
            The mask file (on the upload's voxel grid) with the label names.
        """
        ctype, body = self._form(image, output, prompts, tta)
        path = f"/v1/models/{urllib.parse.quote(model, safe='')}/predict"
        _, headers, data = self.request("POST", path, body=body, content_type=ctype, timeout_s=timeout_s)
        return self._result(headers, data)

    def statistics(
        self, model: str, image: str | Path | tuple[str, bytes], *, prompts: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``output=json``: ``{"model", "label_names", "labels": {name: {value, voxels, volume_ml}}, "shape"}``."""
        return dict(self.predict(model, image, output="json", prompts=prompts).json())

    # -- jobs ------------------------------------------------------------------------------------------------------

    def submit_job(
        self,
        model: str,
        image: str | Path | tuple[str, bytes],
        *,
        output: str = "nrrd",
        prompts: Mapping[str, Any] | None = None,
        tta: bool | None = None,
    ) -> str:
        """Queue a job (``POST /v1/jobs``); returns its id. 503 ``QueueFull`` when the queue is full."""
        ctype, body = self._form(image, output, prompts, tta, model=model)
        return str(self._json("POST", "/v1/jobs", body=body, content_type=ctype)["id"])

    def job_status(self, job_id: str) -> JobStatus:
        """``GET /v1/jobs/{id}``."""
        return JobStatus.from_body(self._json("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}"))

    def cancel_job(self, job_id: str) -> str:
        """``DELETE /v1/jobs/{id}``: ``cancelled`` for a queued/running job, ``deleted`` for a finished one."""
        return str(self._json("DELETE", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}")["state"])

    def job_result(self, job_id: str) -> Result:
        """``GET /v1/jobs/{id}/result`` of a finished job (409 when its result is gone)."""
        _, headers, data = self.request("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/result")
        return self._result(headers, data)

    def wait_job(
        self,
        job_id: str,
        *,
        poll_s: float = 0.5,
        timeout_s: float = 3600.0,
        on_progress: Callable[[JobStatus], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> JobStatus:
        """Poll a job until it is done, failed or cancelled.

        Args:
            job_id: the id from :meth:`submit_job`.
            poll_s: seconds between polls.
            timeout_s: give up (and cancel the job) after this many seconds.
            on_progress: called with every status polled (e.g. to move a progress bar and keep a GUI alive).
            should_cancel: polled before each status request; when it returns True the job is cancelled.
            sleep: the wait between polls (a GUI passes one that processes its events).

        Returns:
            The final status (``state`` ``done``, ``failed`` or ``cancelled``).

        Raises:
            MedSegServerError: ``Timeout`` when the job did not finish in ``timeout_s`` (it is cancelled first).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if should_cancel is not None and should_cancel():
                self.cancel_job(job_id)
                return self.job_status(job_id)
            status = self.job_status(job_id)
            if on_progress is not None:
                on_progress(status)
            if status.finished:
                return status
            if time.monotonic() > deadline:
                self.cancel_job(job_id)
                raise MedSegServerError(
                    None,
                    "Timeout",
                    f"job {job_id} did not finish within {timeout_s:g} s and was cancelled",
                    hint="try a smaller input or ask the server administrator about the job time limit",
                )
            sleep(poll_s)

    def run_job(
        self,
        model: str,
        image: str | Path | tuple[str, bytes],
        *,
        output: str = "nrrd",
        prompts: Mapping[str, Any] | None = None,
        tta: bool | None = None,
        **wait: Any,
    ) -> Result | None:
        """Submit, wait (``wait`` goes to :meth:`wait_job`) and fetch the result; None when cancelled.

        Raises:
            MedSegServerError: the job failed (``JobFailed`` with the server's reason) or any call failed.
        """
        job_id = self.submit_job(model, image, output=output, prompts=prompts, tta=tta)
        status = self.wait_job(job_id, **wait)
        if status.state == "cancelled":
            return None
        if status.state != "done":
            raise MedSegServerError(
                None,
                "JobFailed",
                f"job {job_id} failed: {status.error or 'no reason given'}",
                hint="see the server log for this job id",
            )
        return self.job_result(job_id)
