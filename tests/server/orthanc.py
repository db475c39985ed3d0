"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests: temp storage, loopback HTTP, basic auth.

Usage::

    with OrthancProcess.start(tmp_path) as orthanc:
        orthanc.upload(dicom_bytes)
        client = DICOMwebClient(orthanc.dicomweb_url, session=...)

Orthanc 1.10 has no bind-address option for its DICOM port; HTTP is kept to loopback by
``RemoteAccessAllowed: false`` and the URL we use. Free ports are picked by binding port 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

logger = logging.getLogger(__name__)

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medseg-test", "orthanc-secret-7f3a"


def orthanc_missing_reason() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if not ORTHANC_BIN.is_file():
        return f"{ORTHANC_BIN} not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{DICOMWEB_PLUGIN} not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancProcess:
    """A running Orthanc; stop it with :meth:`stop` or use it as a context manager."""

    process: subprocess.Popen[bytes]
    http_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    @classmethod
    def start(cls, workdir: Path, timeout_s: float = 20.0) -> OrthancProcess:
        """Write a config under ``workdir``, start Orthanc and wait until ``GET /system`` answers."""
        workdir.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        config = {
            "Name": "medseg-test",
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "MEDSEGTEST",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [str(ORTHANC_BIN), str(config_path)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()  # the child holds its own descriptor
        orthanc = cls(process, http_port, workdir)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {process.returncode}: {orthanc.log_tail()}")
            try:
                if httpx.get(f"{orthanc.url}/system", auth=orthanc.auth, timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                orthanc.stop()
                raise RuntimeError(f"Orthanc did not answer within {timeout_s} s: {orthanc.log_tail()}")
            time.sleep(0.1)
        logger.info("Orthanc ready on %s (pid %d)", orthanc.url, process.pid)
        return orthanc

    def log_tail(self, n: int = 20) -> str:
        path = self.workdir / "orthanc.log"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        return " | ".join(lines[-n:])

    def upload(self, data: bytes) -> dict[str, object]:
        """Store one DICOM file through the REST API (``POST /instances``)."""
        response = httpx.post(f"{self.url}/instances", content=data, auth=self.auth, timeout=30.0)
        response.raise_for_status()
        return response.json()

    def upload_folder(self, folder: Path) -> int:
        """Store every file under ``folder``; returns how many were stored."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            self.upload(path.read_bytes())
        return len(files)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait, and SIGKILL if it does not exit in time (only this process, by its id)."""
        if self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("Orthanc pid %d ignored SIGTERM; killing it", self.process.pid)
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> OrthancProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
