"""The real server: ``python -m pipelines.serve`` (uvicorn) in a subprocess on 127.0.0.1, serving the tiny model.

Covers predict in nifti/nrrd/json with the upload's exact geometry (SimpleITK size/spacing/origin/direction), the
job lifecycle, the queue cap (503 + Retry-After), a job timeout that kills the worker process, and ``kill -9`` of
the server while a job runs: after a restart on the same data dir, the interrupted job and the one queued behind it
both complete, and no orphan worker is left computing.

Slow jobs are made slow by their input: a 256³ volume with flip TTA needs 1331 sliding windows of the tiny model
per flip (about 30 s on 2 free CPU cores, ~10 ms a window), far past the 8 s job timeout of the module's server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai.data import MetaTensor

from medseg.io import save_image
from tests.helpers import make_case, tiny_affine
from tests.server.conftest import API_KEY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KEY = {"X-API-Key": API_KEY}
JOB_TIMEOUT_S = 8
ACTIVE = ("queued", "running")


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    client: httpx.Client

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models_dir: Path, data_dir: Path, **settings: object) -> LiveServer:
    """``python -m pipelines.serve`` on a free loopback port; returns once ``/readyz`` answers 200."""
    port = _free_port()
    settings_file = data_dir.parent / f"settings-{port}.yaml"
    values = {"data_dir": str(data_dir), "api_keys": [API_KEY], "device": "cpu", **settings}
    settings_file.write_text(yaml.safe_dump(values))
    log = data_dir.parent / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_")}
    cmd = [sys.executable, "-m", "pipelines.serve", "--models", str(models_dir), "--port", str(port)]
    cmd += ["--settings", str(settings_file), "--log-level", "warning"]
    with open(log, "wb") as fh:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log, httpx.Client(headers=KEY, timeout=120.0))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if server.client.get(f"{server.url}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"server did not become ready in 120 s:\n{server.log_tail()}")


def stop_server(server: LiveServer) -> None:
    server.client.close()
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


def children(pid: int) -> dict[int, bytes]:
    """Child processes of ``pid`` → their command lines (Linux ``/proc``)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def worker_pid(server: LiveServer) -> int | None:
    return next((p for p, cmd in children(server.process.pid).items() if b"spawn_main" in cmd), None)


def pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def write_image(path: Path, shape: tuple[int, int, int] = (32, 28, 36), constant: float | None = None) -> Path:
    if constant is not None:
        data = np.full(shape, constant, np.float32)
    else:
        data = make_case(np.random.default_rng(5), shape)[0]
    save_image(MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(tiny_affine())), path)
    return path


def submit(server: LiveServer, image: Path, **fields: str) -> httpx.Response:
    with open(image, "rb") as fh:
        return server.client.post(
            f"{server.url}/v1/jobs", files={"file": (image.name, fh)}, data={"model": "tiny", **fields}
        )


def wait_job(server: LiveServer, job_id: str, until: tuple[str, ...] = ("done", "failed", "cancelled"), t: float = 120):
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        status = server.client.get(f"{server.url}/v1/jobs/{job_id}").json()
        if status["state"] in until:
            return status
        time.sleep(0.1)
    pytest.fail(f"job {job_id} not in {until} after {t} s: {status}\n{server.log_tail()}")


def same_geometry(reference: Path, result: Path) -> None:
    ref, res = sitk.ReadImage(str(reference)), sitk.ReadImage(str(result))
    assert res.GetSize() == ref.GetSize()
    np.testing.assert_allclose(res.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(res.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(res.GetDirection(), ref.GetDirection(), atol=1e-5)


@pytest.fixture(scope="module")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("live")
    server = start_server(models_dir, root / "data", max_queue=2, job_timeout_s=JOB_TIMEOUT_S)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Constant and non-zero: every window runs (the foreground box is the whole image), and it is cheap to write.
    return write_image(tmp_path_factory.mktemp("slow") / "slow.nii.gz", (256, 256, 256), constant=100.0)


@pytest.mark.parametrize(
    ("upload", "output"), [("nii.gz", "nifti"), ("nii.gz", "nrrd"), ("nrrd", "nifti"), ("mha", "nrrd"), ("nii", "json")]
)
def test_predict_keeps_the_upload_geometry(live: LiveServer, tmp_path: Path, upload: str, output: str) -> None:
    image = write_image(tmp_path / f"case.{upload}")
    with open(image, "rb") as fh:
        r = live.client.post(
            f"{live.url}/v1/models/tiny/predict", files={"file": (image.name, fh)}, params={"output": output}
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-label-names"] == '["background", "sphere", "box"]'
    assert int(r.headers["content-length"]) == len(r.content)
    if output == "json":
        assert r.json()["shape"] == [32, 28, 36] and set(r.json()["labels"]) == {"sphere", "box"}
        return
    suffix = ".nii.gz" if output == "nifti" else ".nrrd"
    assert r.headers["content-disposition"] == f'attachment; filename="case_seg{suffix}"'
    result = tmp_path / f"mask{suffix}"
    result.write_bytes(r.content)
    same_geometry(image, result)


def test_job_lifecycle(live: LiveServer, tmp_path: Path) -> None:
    image = write_image(tmp_path / "job.nii.gz")
    r = submit(live, image, output="nrrd")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["state"] == "queued" and r.headers["location"] == f"/v1/jobs/{job_id}"
    early = live.client.get(f"{live.url}/v1/jobs/{job_id}/result")
    if live.client.get(f"{live.url}/v1/jobs/{job_id}").json()["state"] in ACTIVE:
        assert early.status_code in (409, 200) and (early.status_code == 200 or early.json()["error"] == "JobNotDone")
    status = wait_job(live, job_id)
    assert status["state"] == "done", status
    assert status["progress"] == 1.0 and status["attempts"] == 1 and status["error"] is None
    assert status["run_s"] > 0 and status["finished_at"] and status["result_url"] == f"/v1/jobs/{job_id}/result"
    r = live.client.get(f"{live.url}{status['result_url']}")
    assert r.status_code == 200 and r.headers["content-disposition"] == 'attachment; filename="job_seg.nrrd"'
    assert r.headers["x-label-names"] == '["background", "sphere", "box"]'
    (tmp_path / "mask.nrrd").write_bytes(r.content)
    same_geometry(image, tmp_path / "mask.nrrd")
    assert live.client.delete(f"{live.url}/v1/jobs/{job_id}").json() == {"id": job_id, "state": "deleted"}
    assert live.client.get(f"{live.url}/v1/jobs/{job_id}").status_code == 404
    assert live.client.get(f"{live.url}/v1/jobs/{'0' * 32}/result").json()["error"] == "NotFound"


def test_queue_cap_timeout_and_worker_restart(live: LiveServer, slow_image: Path, tmp_path: Path) -> None:
    first = submit(live, slow_image, tta="true")
    second = submit(live, slow_image, tta="true")
    assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
    full = submit(live, slow_image)
    assert full.status_code == 503 and full.json()["error"] == "QueueFull" and int(full.headers["retry-after"]) > 0
    cancelled = live.client.delete(f"{live.url}/v1/jobs/{second.json()['id']}")
    assert cancelled.json()["state"] == "cancelled"
    job_id = first.json()["id"]
    wait_job(live, job_id, until=("running",))
    deadline = time.monotonic() + 60
    while (pid := worker_pid(live)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid is not None, live.log_tail()
    status = wait_job(live, job_id, t=JOB_TIMEOUT_S + 90)
    assert status["state"] == "failed" and status["error"] == f"timed out after {JOB_TIMEOUT_S} s", status
    assert pid_gone(pid), "the timed-out worker process is still alive"
    assert live.client.get(f"{live.url}/v1/jobs/{job_id}/result").status_code == 409
    small = submit(live, write_image(tmp_path / "small.nii.gz"), output="json")
    assert wait_job(live, small.json()["id"])["state"] == "done"  # a fresh worker took over
    assert worker_pid(live) not in (None, pid)


def test_kill9_during_a_job_then_restart_loses_no_job(models_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(models_dir, data)
    try:
        running = submit(server, write_image(tmp_path / "mid.nii.gz", (96, 96, 96), constant=100.0)).json()["id"]
        queued = submit(server, write_image(tmp_path / "small.nii.gz"), output="json").json()["id"]
        deadline = time.monotonic() + 90
        while (status := server.client.get(f"{server.url}/v1/jobs/{running}").json())["progress"] < 0.4:
            assert status["state"] in ACTIVE and time.monotonic() < deadline, status
            time.sleep(0.02)
        assert status["state"] == "running"  # inference is under way in the worker
        kids = children(server.process.pid)
        assert any(b"spawn_main" in cmd for cmd in kids.values()), kids
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    finally:
        stop_server(server)
    deadline = time.monotonic() + 15
    while not all(pid_gone(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(pid_gone(pid) for pid in kids), "a child of the killed server is still running"

    server = start_server(models_dir, data)
    try:
        first = wait_job(server, running)
        assert first["state"] == "done" and first["attempts"] == 2, first  # re-queued once, then completed
        second = wait_job(server, queued)
        assert second["state"] == "done" and second["attempts"] == 1, second
        r = server.client.get(f"{server.url}/v1/jobs/{running}/result")
        assert r.status_code == 200
        (tmp_path / "mask.nii.gz").write_bytes(r.content)
        same_geometry(tmp_path / "mid.nii.gz", tmp_path / "mask.nii.gz")
    finally:
        stop_server(server)
