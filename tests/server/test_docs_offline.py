"""The OpenAPI pages (``/docs``, ``/redoc``) work without internet: their scripts, styles and favicon are local.

A plain test reads the HTML of both pages and refuses any ``http(s)://`` URL outside 127.0.0.1 in ``<script>`` or
``<link>`` tags, and checks every local asset is actually served. The browser test starts the live server on
127.0.0.1 and loads both pages in headless Chromium (Debian ``chromium``; ``.ci/run`` installs it) with every other
host unreachable: names other than 127.0.0.1 do not resolve and all other traffic goes to a proxy that is not there.
Swagger UI and ReDoc build the page in JavaScript, so the operations' summaries appear in the DOM only when the
scripts really loaded; with FastAPI's default pages (assets on a public CDN) they are missing and the page is blank.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from server.app import create_app
from server.models import ModelStore
from server.settings import Settings
from tests.server.live import Live, live_server

# Summaries of the predict and jobs operations, as the OpenAPI schema names them (``summary=`` of the routes).
PREDICT_SUMMARY = "Segment one image"
JOBS_SUMMARY = "Queue a segmentation job"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_TIMEOUT_S = 45
SWAGGER_POST_RGB = (73, 204, 144)  # Swagger UI's colours of a POST and a GET operation bar
SWAGGER_GET_RGB = (97, 175, 254)
MARKER = "medseg-isolation-marker"


class _AssetParser(HTMLParser):
    """Collects the URLs a page loads by itself: ``<script src>``, ``<link href>`` and ``<img src>``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        key = {"script": "src", "link": "href", "img": "src"}.get(tag)
        if key and values.get(key):
            self.urls.append(str(values[key]))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline_scripts.append(data)


def _external(urls: list[str]) -> list[str]:
    """The absolute URLs (``//host`` included) whose host is not the loopback address."""
    out = []
    for url in urls:
        parts = urlsplit(url)
        if (parts.scheme or url.startswith("//")) and parts.hostname not in ("127.0.0.1", "localhost"):
            out.append(url)
    return out


@pytest.fixture()
def live(server_settings: Settings, tiny_models: ModelStore) -> Iterator[Live]:
    with live_server(server_settings, tiny_models) as server:
        yield server


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_html_references_no_external_url(server_settings: Settings, tiny_models: ModelStore, page: str) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(server_settings, models=tiny_models), base_url="http://127.0.0.1") as client:
        response = client.get(page)  # no credentials: the docs pages stay public, as openapi.json does
        assert response.status_code == 200, response.text
        parser = _AssetParser()
        parser.feed(response.text)
        assert parser.urls, f"{page} loads no script or stylesheet at all"
        assert _external(parser.urls) == [], f"{page} loads assets from outside: {_external(parser.urls)}"
        # Inline scripts (the Swagger UI bootstrap) must not point anywhere outside either.
        inline = "\n".join(parser.inline_scripts)
        assert re.findall(r"https?://(?!127\.0\.0\.1)[^\s'\"]+", inline) == []
        for url in parser.urls:
            asset = client.get(urljoin(f"http://127.0.0.1{page}", url))
            assert asset.status_code == 200, f"{page} references {url}, which answers {asset.status_code}"
            assert len(asset.content) > 1000, f"{url} is suspiciously small ({len(asset.content)} bytes)"
        assert client.get("/openapi.json").status_code == 200


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless Chromium binary on PATH (looked for {', '.join(CHROMIUM_NAMES)}); .ci/run installs it")


def _dead_port() -> int:
    """A loopback port nothing listens on (bound then released), used as the only proxy for non-local traffic."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_chromium(url: str, profile: Path, *extra: str, offline: bool = True) -> subprocess.CompletedProcess[str]:
    """Load ``url`` in headless Chromium; ``offline`` leaves only 127.0.0.1 reachable (the hospital network)."""
    args = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",  # let the page's scripts run (and fetch openapi.json) before the dump
        "--window-size=1280,1400",
    ]
    if offline:
        # No name or address but 127.0.0.1 resolves, and any other traffic goes to a proxy that is not there.
        args += [
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--proxy-server=http://127.0.0.1:{_dead_port()}",
            "--proxy-bypass-list=127.0.0.1",
        ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox on
    args += [*extra, url]
    # A headless Chromium occasionally never exits after its dump on a loaded machine: one retry with a fresh profile
    # (the second run has to render the page by itself, so this cannot hide a blank page).
    for attempt in (1, 2):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
            fresh = profile.with_name(profile.name + "-retry")
            args = [f"--user-data-dir={fresh}" if a.startswith("--user-data-dir=") else a for a in args]
    raise AssertionError("unreachable")


def _pixels_near(png: Path, rgb: tuple[int, int, int]) -> int:
    """How many pixels of ``png`` are within a small distance of the colour ``rgb``."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30).sum())


@pytest.mark.integration
def test_docs_render_offline_in_headless_chromium(live: Live, tmp_path: Path) -> None:
    # /docs: Swagger UI lists the operations (one "opblock" each) with their summaries.
    screenshot = tmp_path / "docs.png"
    result = _run_chromium(f"{live.url}/docs", tmp_path / "profile-docs", "--dump-dom", f"--screenshot={screenshot}")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'id="swagger-ui"' in dom, dom[:2000]
    assert PREDICT_SUMMARY in dom and JOBS_SUMMARY in dom, f"/docs rendered no operations offline:\n{dom[:3000]}"
    assert dom.count("opblock-summary-path") >= 5
    assert 'data-path="/v1/models/{name}/predict"' in dom and 'data-path="/v1/jobs"' in dom
    # The screenshot shows the operations: Swagger UI's green POST and blue GET bars, not a white page.
    assert screenshot.is_file(), result.stderr[-2000:]
    assert _pixels_near(screenshot, SWAGGER_POST_RGB) > 2000, f"no POST operation visible in {screenshot}"
    assert _pixels_near(screenshot, SWAGGER_GET_RGB) > 2000, f"no GET operation visible in {screenshot}"

    # /redoc: ReDoc renders the same operations in its own layout.
    result = _run_chromium(f"{live.url}/redoc", tmp_path / "profile-redoc", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert PREDICT_SUMMARY in dom and JOBS_SUMMARY in dom, f"/redoc rendered no operations offline:\n{dom[:3000]}"
    assert "api-content" in dom

    # The pages needed no credentials, and the API behind them is still protected.
    assert httpx.get(f"{live.url}/v1/models", timeout=10).status_code == 401


class _Marker(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        body = f"<html><body><p>{MARKER}</p></body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the signature of http.server)
        pass


#: Another loopback address (Linux routes all of 127.0.0.0/8 to lo): reachable, but not the one the offline browser
#: is allowed, so it stands in for "any other host" without sending a packet off this machine.
OTHER_HOST = "127.0.0.2"


@pytest.mark.integration
def test_offline_chromium_reaches_nothing_but_loopback(tmp_path: Path) -> None:
    """The isolation the browser test relies on is real: a host that answers without it is unreachable with it."""
    _chromium()
    address = OTHER_HOST
    try:
        server = ThreadingHTTPServer((address, 0), _Marker)
    except OSError as exc:
        pytest.skip(f"cannot listen on {address} ({exc})")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://{address}:{server.server_address[1]}/"
        reached = _run_chromium(url, tmp_path / "profile-open", "--dump-dom", offline=False)
        assert MARKER in reached.stdout, f"control: {url} is not reachable even without isolation"
        blocked = _run_chromium(url, tmp_path / "profile-offline", "--dump-dom")
        assert MARKER not in blocked.stdout, f"the offline browser still reached {url}"
    finally:
        server.shutdown()
        server.server_close()
