"""``worker_threads``: the job worker's torch threads come from the server settings (replicas sharing a machine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from medseg.core.errors import ConfigError
from server.jobs import manager as manager_module
from server.jobs.manager import JobManager
from server.jobs.worker import Worker
from server.settings import load_settings


def test_worker_threads_defaults_to_none_and_refuses_zero(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path, auth_enabled=False).worker_threads is None
    assert load_settings(data_dir=tmp_path, auth_enabled=False, worker_threads=1).worker_threads == 1
    with pytest.raises(ConfigError, match="worker_threads"):
        load_settings(data_dir=tmp_path, auth_enabled=False, worker_threads=0)


def test_the_manager_starts_its_worker_with_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int | None] = []

    class FakeWorker:
        def __init__(self, threads: int | None = None) -> None:
            started.append(threads)
            self.ready = True  # _worker_ready returns at once without a process
            self.process = self

        def is_alive(self) -> bool:
            return True

    monkeypatch.setattr(manager_module, "Worker", FakeWorker)
    manager = JobManager(load_settings(data_dir=tmp_path, auth_enabled=False, worker_threads=1))
    job: Any = object()  # not read while the worker is already ready
    assert manager._worker_ready(job)
    assert started == [1]


def _ready_threads(worker: Worker, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.conn.poll(0.2):
            message = worker.conn.recv()
            assert message[0] == "ready"
            return int(message[2])
        assert worker.process.is_alive(), "the worker process died before it was ready"
    raise AssertionError(f"the worker was not ready after {timeout_s} s")


def test_worker_process_runs_torch_with_the_given_threads() -> None:
    worker = Worker(threads=1)
    try:
        assert _ready_threads(worker) == 1
    finally:
        worker.kill()
