"""Two real server replicas (``python -m pipelines.serve`` = uvicorn, each its own process and job worker) on one
PostgreSQL job store and one shared folder, serving the tiny model.

One scenario: a slow job and a small job are submitted to replica A; one replica claims the slow job, so the other
claims and runs the small one; its result (written by that replica's worker into the shared folder) is fetched
from the busy replica with the upload's geometry (rows hold paths relative to the shared folder, which B mounts
under another path); a token issued by A is accepted by B; ``DELETE`` of the slow job sent to the replica that is
not running it marks the row, and the running replica stops the work (its worker process is killed) at its next
lease heartbeat.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.server.test_uvicorn import (
    LiveServer,
    children,
    pid_gone,
    same_geometry,
    start_server,
    stop_server,
    submit,
    wait_job,
    write_image,
)

pytestmark = pytest.mark.integration

SECRET = "live-replica-secret-0123456789-abcdef"
USER, PASSWORD = "radiologist", "pw-0123456789"
LEASE_S = 3.0  # heartbeat every second


def _row(pg_url: str, job_id: str) -> tuple[str, str, str | None]:
    """``(lease_owner, input_path, result_path)`` of a job, read from the database."""
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT lease_owner, input_path, result_path FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def _owner(pg_url: str, job_id: str) -> str | None:
    return _row(pg_url, job_id)[0]


def _worker_pids(server: LiveServer) -> list[int]:
    return [p for p, cmd in children(server.process.pid).items() if b"spawn_main" in cmd]


def test_two_replicas_share_jobs_results_tokens_and_cancellation(models_dir: Path, tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "mount-b").symlink_to(tmp_path / "shared")  # B sees the shared folder under another path
    common = {
        "jobs_database_url": pg_url,
        "token_secret": SECRET,
        "job_lease_s": LEASE_S,
        "users": {USER: PASSWORD},
    }
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                start_server,
                models_dir,
                tmp_path / f"data-{n}",
                replica_id=f"replica-{n}",
                shared_dir=str(shared),
                **common,
            )
            for n, shared in (("a", tmp_path / "shared"), ("b", tmp_path / "mount-b"))
        ]
        a, b = (f.result() for f in futures)
    try:
        servers = {"replica-a": a, "replica-b": b}
        slow = submit(a, write_image(tmp_path / "slow.nii.gz", (256, 256, 256), constant=100.0), tta="true")
        image = write_image(tmp_path / "small.nii.gz")
        small = submit(a, image, output="nrrd")  # whichever replica took the slow job is busy: the other takes this
        assert slow.status_code == 202 and small.status_code == 202, (slow.text, small.text)
        slow_id, small_id = slow.json()["id"], small.json()["id"]

        done = wait_job(a, small_id, t=120)
        assert done["state"] == "done" and done["attempts"] == 1, (done, a.log_tail(), b.log_tail())
        ran_small, ran_slow = _owner(pg_url, small_id), _owner(pg_url, slow_id)
        assert {ran_small, ran_slow} == set(servers), (ran_small, ran_slow)  # one job each
        assert _row(pg_url, small_id)[1:] == (f"{small_id}/input.nii.gz", f"{small_id}/result.nrrd")  # relative
        busy, other = servers[ran_slow], servers[ran_small]  # type: ignore[index]
        r = busy.client.get(f"{busy.url}/v1/jobs/{small_id}/result")  # written by the other replica's worker
        assert r.status_code == 200 and r.headers["x-label-names"] == '["background", "sphere", "box"]'
        (tmp_path / "mask.nrrd").write_bytes(r.content)
        same_geometry(image, tmp_path / "mask.nrrd")

        form = {"username": USER, "password": PASSWORD, "grant_type": "password"}
        token = httpx.post(f"{a.url}/auth/token", data=form).json()["access_token"]
        assert httpx.get(f"{b.url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200

        assert other.client.get(f"{other.url}/v1/jobs/{slow_id}").json()["state"] == "running"
        (busy_worker,) = _worker_pids(busy)
        cancelled = other.client.delete(f"{other.url}/v1/jobs/{slow_id}")  # sent to the replica not running it
        assert cancelled.json() == {"id": slow_id, "state": "cancelled"}, cancelled.text
        deadline = time.monotonic() + LEASE_S + 5
        while not pid_gone(busy_worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_gone(busy_worker), f"{ran_slow} kept computing a job cancelled elsewhere\n{busy.log_tail()}"
        final = busy.client.get(f"{busy.url}/v1/jobs/{slow_id}").json()
        assert final["state"] == "cancelled" and final["error"] == "cancelled by request"
    finally:
        stop_server(a)
        stop_server(b)
