"""A client that talks to the server the way 3D Slicer's MONAILabel module does (written for the tests).

It reproduces what matters on the wire, from the facts in ``docs/server.md``, "MONAI Label protocol":

* plain ``http.client`` connections, one per call;
* multipart bodies with the fixed boundary ``----------lImIt_of_THE_fIle_eW_$``: a ``params`` field (a JSON string
  carrying ``client_id``; for inference also ``result_extension`` and ``result_dtype``) and file parts whose
  ``filename`` is the full local path of the file;
* a multipart reply read straight from the raw socket file (``response.fp``), not through ``http.client``'s chunk
  decoding: a chunked reply corrupts the file, so this client refuses any multipart reply without ``Content-Length``;
  file parts (those with a filename) are keyed by filename and written to ``tmpdir/<filename>``, form fields by name;
* auth: ``GET /auth/``; when enabled ``POST /auth/token`` (form ``username``, ``password``, ``grant_type=password``)
  and then ``Authorization: <token_type> <access_token>`` on every call.

``parse_with_cgi`` parses a reply with the standard library's ``cgi.FieldStorage``, the parser Slicer's client
uses (available up to Python 3.12), so tests can check both agree.
"""

from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode, urlparse

BOUNDARY = "----------lImIt_of_THE_fIle_eW_$"


class SlicerClientError(Exception):
    """A non-200 reply or a reply the Slicer client could not use."""

    def __init__(self, status: int, body: bytes | str) -> None:
        super().__init__(f"status {status}: {body[:300]!r}")
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class RawReply:
    """What came back: status, headers (lower-case names), raw body bytes, and for multipart the parsed parts."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.form: dict[str, str] = {}
        self.files: dict[str, bytes] = {}


def encode_multipart(fields: dict[str, str], files: dict[str, str | Path]) -> tuple[str, bytes]:
    """The body Slicer's client builds: fields first, then each file with its full path as the filename."""
    lines: list[bytes | str] = []
    for key, value in fields.items():
        lines += [f"--{BOUNDARY}", f'Content-Disposition: form-data; name="{key}"', "", value]
    for key, filename in files.items():
        data = Path(filename).read_bytes()
        ctype = mimetypes.guess_type(str(filename))[0] or "application/octet-stream"
        lines += [f"--{BOUNDARY}", f'Content-Disposition: form-data; name="{key}"; filename="{filename}"']
        lines += [f"Content-Type: {ctype}", "", data]
    lines += [f"--{BOUNDARY}--", ""]
    body = bytearray()
    for line in lines:
        body += line if isinstance(line, bytes) else line.encode("utf-8")
        body += b"\r\n"
    return f"multipart/form-data; boundary={BOUNDARY}", bytes(body)


def _header_param(header: str, value: str, param: str) -> str | None:
    msg = Message()
    msg[header] = value
    found = msg.get_param(param, header=header)
    return None if found is None else str(found)


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """Split a multipart body into form fields (by name) and files (by filename), as Slicer's client does.

    Byte-exact: a part's payload is everything between its blank line and the CRLF before the next delimiter.
    """
    boundary = _header_param("content-type", content_type, "boundary")
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise ValueError(f"not a multipart content type: {content_type!r}")
    delimiter = b"--" + boundary.encode()
    if not body.startswith(delimiter):
        raise ValueError("multipart body does not start with its boundary")
    form: dict[str, str] = {}
    files: dict[str, bytes] = {}
    closed = False
    for chunk in body[len(delimiter) :].split(b"\r\n" + delimiter):
        if chunk.startswith(b"--"):
            closed = True
            break
        head, sep, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header/body separator")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.decode("latin-1").partition(":") for line in head.split(b"\r\n"))
        )
        disposition = headers.get("content-disposition", "")
        filename = _header_param("content-disposition", disposition, "filename")
        if filename:
            files[filename] = payload
        else:
            form[_header_param("content-disposition", disposition, "name") or ""] = payload.decode("utf-8")
    if not closed:
        raise ValueError("multipart body has no closing delimiter (truncated?)")
    return form, files


def parse_with_cgi(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """The same split done by ``cgi.FieldStorage`` (Slicer's parser); raises ImportError where cgi is gone."""
    import cgi

    fs = cgi.FieldStorage(
        fp=io.BytesIO(body),
        environ={"REQUEST_METHOD": "POST"},
        headers={"content-type": content_type, "content-length": str(len(body))},
        keep_blank_values=True,
    )
    form: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for f in fs.list or []:
        if f.filename:
            files[f.filename] = f.value
        else:
            form[f.name] = f.value
    return form, files


class SlicerClient:
    """Calls the MONAI Label endpoints the way the Slicer module does.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000``.
        tmpdir: where result files are written (``tmpdir/<filename from the reply>``).
        client_id: sent in every ``params``.
    """

    def __init__(self, server_url: str, tmpdir: Path, client_id: str = "user-xyz") -> None:
        self.server_url = server_url.rstrip("/")
        self.tmpdir = Path(tmpdir)
        self.client_id = client_id
        self.headers: dict[str, str] = {}
        self.last: RawReply | None = None

    # ---- transport ------------------------------------------------------------------------------------------
    def _request(self, method: str, selector: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        parsed = urlparse(self.server_url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        all_headers = {**self.headers, **(headers or {})}
        conn.request(method, parsed.path.rstrip("/") + "/" + selector.lstrip("/"), body=body, headers=all_headers)
        response = conn.getresponse()
        headers_lc = {k.lower(): v for k, v in response.getheaders()}
        ctype = headers_lc.get("content-type", "")
        if "multipart" in ctype and response.status == 200:
            # Like Slicer's client: read the raw socket file, bypassing http.client's transfer decoding.
            if "content-length" not in headers_lc or "chunked" in headers_lc.get("transfer-encoding", "").lower():
                conn.close()
                raise SlicerClientError(response.status, b"multipart reply without Content-Length (chunked)")
            raw = response.fp.read(int(headers_lc["content-length"]))
            reply = RawReply(response.status, headers_lc, raw)
            reply.form, reply.files = parse_multipart(ctype, raw)
        else:
            reply = RawReply(response.status, headers_lc, response.read())
        conn.close()
        self.last = reply
        return reply

    def _json(self, reply: RawReply) -> Any:
        if reply.status != 200:
            raise SlicerClientError(reply.status, reply.body)
        return json.loads(reply.body)

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        params = dict(params or {})
        params["client_id"] = self.client_id
        return params

    def multipart(self, method: str, selector: str, fields: dict[str, str], files: dict[str, str | Path]) -> RawReply:
        content_type, body = encode_multipart(fields, files)
        headers = {"content-type": content_type, "content-length": str(len(body))}
        return self._request(method, selector, body, headers)

    # ---- auth -----------------------------------------------------------------------------------------------
    def auth_enabled(self) -> bool:
        return bool(self._json(self._request("GET", "/auth/"))["enabled"])

    def login(self, username: str, password: str) -> str:
        body = urlencode({"username": username, "password": password, "grant_type": "password"}).encode()
        headers = {"content-type": "application/x-www-form-urlencoded", "content-length": str(len(body))}
        token = self._json(self._request("POST", "/auth/token", body, headers))
        self.headers["Authorization"] = f"{token['token_type']} {token['access_token']}"
        return token["access_token"]

    # ---- calls ----------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/info/"))

    def datastore(self, output: str = "all") -> Any:
        return self._json(self._request("GET", f"/datastore/?output={quote_plus(output)}"))

    def upload_image(self, image_in: str | Path, image_id: str, params: dict[str, Any] | None = None) -> Any:
        fields = {"params": json.dumps(self._params(params))}
        reply = self.multipart("PUT", f"/datastore/?image={quote_plus(image_id)}", fields, {"file": image_in})
        return self._json(reply)

    def save_label(self, image_id: str, label_in: str | Path, tag: str = "", params: dict | None = None) -> Any:
        selector = f"/datastore/label?image={quote_plus(image_id)}" + (f"&tag={quote_plus(tag)}" if tag else "")
        reply = self.multipart("PUT", selector, {"params": json.dumps(self._params(params))}, {"label": label_in})
        return self._json(reply)

    def download_image(self, image_id: str) -> bytes:
        reply = self._request("GET", f"/datastore/image?image={quote_plus(image_id)}")
        if reply.status != 200:
            raise SlicerClientError(reply.status, reply.body)
        return reply.body

    def infer(
        self,
        model: str,
        image_id: str,
        params: dict[str, Any] | None = None,
        file: str | Path | None = None,
        label_in: str | Path | None = None,
        session_id: str | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        """Run inference; returns (result file written under ``tmpdir``, the reply's params).

        As the Slicer module does, ``result_extension`` defaults to ``.nrrd`` and ``result_dtype`` to ``uint8``.
        """
        params = {"result_extension": ".nrrd", "result_dtype": "uint8", **self._params(params)}
        selector = f"/infer/{quote_plus(model)}?image={quote_plus(image_id)}"
        if session_id:
            selector += f"&session_id={quote_plus(session_id)}"
        files: dict[str, str | Path] = {"label": label_in} if label_in else {}
        if file and not session_id:
            files["file"] = file
        reply = self.multipart("POST", selector, {"params": json.dumps(params)}, files)
        if reply.status != 200:
            raise SlicerClientError(reply.status, reply.body)
        out_params = json.loads(reply.form["params"]) if reply.files else json.loads(reply.body)
        for name, data in reply.files.items():  # one file per reply, written under its own name
            result = self.tmpdir / name
            if result.parent != self.tmpdir:
                raise SlicerClientError(reply.status, f"file name {name!r} would escape tmpdir")
            os.makedirs(self.tmpdir, exist_ok=True)
            result.write_bytes(data)
            return result, out_params
        raise SlicerClientError(reply.status, b"multipart reply without a file part")
