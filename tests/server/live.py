"""A live uvicorn server on 127.0.0.1 in a thread of the test process (no second import of torch/MONAI).

Used by the malformed-upload and schemathesis tests; the HTTP framing and error handling are uvicorn's and the app's
own, as in production.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from server.app import create_app
from server.models import ModelStore
from server.settings import Settings


@dataclass
class Live:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def live_server(settings: Settings, models: ModelStore) -> Iterator[Live]:
    """Serve ``create_app(settings, models)`` on a free loopback port until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(create_app(settings, models=models), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn on port {port} did not start")
        time.sleep(0.05)
    try:
        yield Live(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
