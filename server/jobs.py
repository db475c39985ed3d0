"""Asynchronous jobs: a persistent SQLite store and one worker process with a real per-job timeout.

Design:

* **Store** (``settings.jobs_db``, WAL, ``synchronous=FULL``): one row per job (id, model, state, progress, times,
  attempts, error, input/result paths). A job is in the store before ``POST /v1/jobs`` answers 202, so an
  accepted job survives any crash of the server. Every state change is a guarded ``UPDATE ... WHERE state = ?``, so
  a late message can never move a cancelled job back to done.
* **Worker**: one persistent process started with ``multiprocessing`` *spawn* (no forked torch/thread state) on the
  first job and kept: it imports torch once and caches each model it loads (from the job's model folder,
  ``app.state.models.source[name]`` or ``settings.models_dir/name``), so a job costs only its inference. A
  process per job would pay ~2-5 s of imports and model loading per job; the price of reuse is that the worker holds
  its own copy of the models. Jobs run one at a time (the synchronous route runs beside them in the server process).
* **Timeout**: a dispatcher thread in the server sends a job to the worker and waits at most
  ``settings.job_timeout_s``; past it the worker is killed (SIGKILL), the job is ``failed`` with
  ``"timed out after N s"``, and a fresh worker starts for the next job. ``DELETE`` of a running job kills the worker
  the same way. The worker exits by itself when the server process dies (it watches its parent pid), so a
  ``kill -9`` of the server leaves no orphan computing.
* **Recovery** on start: jobs left ``running`` by a killed server are re-queued once; a job that was already retried
  is ``failed`` with ``"server restarted during the job"``. ``queued`` jobs simply run. No accepted job vanishes.
  A graceful stop puts the running job back in the queue without counting the attempt.
* **Capacity**: ``submit`` refuses with 503 + ``Retry-After`` when ``settings.max_queue`` jobs are queued or
  running (checked and inserted in one ``BEGIN IMMEDIATE`` transaction).

The store assumes one server process per ``data_dir`` (recovery re-queues every ``running`` row it finds).

Files: ``data_dir/jobs/<id>/input...`` (the upload: an image file or an extracted DICOM series folder) and
``data_dir/jobs/<id>/result.<ext>``; ``DELETE`` of a finished job removes the row and the folder.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from medseg.core.atomic import atomic_open
from server.errors import ApiError
from server.results import OUTPUTS
from server.schemas import JobState, OutputFormat
from server.settings import Settings

logger = logging.getLogger("server")

ACTIVE = (JobState.queued.value, JobState.running.value)
RESTART_REASON = "server restarted during the job"
PROMPTS_FILE = "prompts.json"
#: How long a fresh worker may take to import torch and report ready.
WORKER_START_TIMEOUT_S = 300.0
_POLL_S = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    model_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    output TEXT NOT NULL,
    tta INTEGER,
    stem TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    input_path TEXT NOT NULL,
    result_path TEXT,
    label_names TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


@dataclass(frozen=True)
class Job:
    """One row of the job store (times are Unix seconds)."""

    id: str
    model: str
    model_dir: str
    state: str
    progress: float
    output: str
    tta: bool | None
    stem: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    error: str | None
    input_path: str
    result_path: str | None
    label_names: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["tta"] = None if data["tta"] is None else bool(data["tta"])
        return cls(**data)

    @property
    def labels(self) -> list[str]:
        return json.loads(self.label_names) if self.label_names else []

    def status(self) -> dict[str, Any]:
        """The public view (``server.schemas.JobStatus``): no paths."""
        end = self.finished if self.finished is not None else (time.time() if self.started is not None else None)
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "progress": round(self.progress, 3),
            "output": self.output,
            "tta": self.tta,
            "created_at": _iso(self.created),
            "started_at": _iso(self.started),
            "finished_at": _iso(self.finished),
            "queued_s": None if self.started is None else round(self.started - self.created, 3),
            "run_s": None if self.started is None or end is None else round(end - self.started, 3),
            "attempts": self.attempts,
            "error": self.error,
            "result_url": f"/v1/jobs/{self.id}/result" if self.state == JobState.done.value else None,
        }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """The SQLite job table; thread-safe (one connection behind a lock, autocommit, explicit transactions)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert_if_room(self, job: Job, max_active: int) -> bool:
        """Insert ``job`` unless ``max_active`` jobs are queued/running; one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (active,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
                if active >= max_active:
                    self._db.execute("ROLLBACK")
                    return False
                row = asdict(job)
                row["tta"] = None if job.tta is None else int(job.tta)
                cols = ", ".join(row)
                self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def active_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()[0])

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY created LIMIT 1", (JobState.queued.value,)
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def transition(self, job_id: str, from_state: str, **fields: Any) -> bool:
        """Set ``fields`` on ``job_id`` if it is still in ``from_state``; True when a row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND state = ?", (*fields.values(), job_id, from_state)
            )
        return cur.rowcount == 1

    def add_attempts(self, job_id: str, delta: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET attempts = MAX(0, attempts + ?) WHERE id = ?", (delta, job_id))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self) -> tuple[int, int]:
        """After a crash: ``running`` jobs tried twice fail, the others go back to the queue. Returns the counts."""
        now = time.time()
        running, queued = JobState.running.value, JobState.queued.value
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            failed = self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE state = ? AND attempts >= 2",
                (JobState.failed.value, RESTART_REASON, now, running),
            ).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET state = ?, progress = 0 WHERE state = ?", (queued, running)
            ).rowcount
            self._db.execute("COMMIT")
        return requeued, failed


# ----------------------------------------------------------------------------------------------- worker process


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit this process as soon as its parent (the server) is gone, even mid-inference."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run_task(task: dict[str, Any], cache: dict[str, Any], conn: Connection) -> tuple[str, list[str]]:
    from medseg.io import load_image
    from server.models import load_model
    from server.results import write_result

    job_id = task["id"]
    conn.send(("progress", job_id, 0.05))
    model = cache.get(task["model_dir"])
    if model is None:
        model = cache[task["model_dir"]] = load_model(Path(task["model_dir"]), task["device"])
    conn.send(("progress", job_id, 0.3))
    source = Path(task["input_path"])
    image = load_image(source)
    conn.send(("progress", job_id, 0.4))
    prompts_file = source.parent / PROMPTS_FILE
    if prompts_file.is_file():
        from medseg.inference.prompts import Prompts

        prompts = Prompts.from_json(json.loads(prompts_file.read_text()))
        prediction = model.predict(image, tta=task["tta"], prompts=prompts)
    else:
        prediction = model.predict(image, tta=task["tta"])
    conn.send(("progress", job_id, 0.9))
    path = write_result(
        prediction,
        OutputFormat(task["output"]),
        source if source.is_dir() else None,
        Path(task["result_path"]),
        model_name=task["model"],
        model_version=task["model_version"],
    )
    return str(path), list(prediction.label_names)


def _public(reason: str, task: dict[str, Any]) -> str:
    """A failure reason without server paths: the job folder and the model folder are replaced by short names."""
    job_dir = str(Path(task["input_path"]).parent)
    return reason.replace(job_dir + os.sep, "").replace(job_dir, "job").replace(task["model_dir"], task["model"])


def worker_main(conn: Connection) -> None:
    """Entry point of the worker process: report ready, then run tasks from ``conn`` until EOF or ``None``."""
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s medseg-worker %(levelname)s %(message)s")
    import server.models  # noqa: F401  (torch, monai and medseg imported once, before the first job)
    from medseg.core.errors import MedsegError

    conn.send(("ready", os.getpid()))
    cache: dict[str, Any] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            path, labels = _run_task(task, cache, conn)
            conn.send(("done", task["id"], path, labels))
        except MedsegError as err:
            conn.send(("failed", task["id"], _public(f"{type(err).__name__}: {err.message}", task)))
        except ApiError as err:
            conn.send(("failed", task["id"], _public(f"{err.error}: {err.detail}", task)))
        except Exception as exc:  # a real fault: log it here, report only its type (no paths or traces leave)
            logging.getLogger("server").exception("job %s failed", task["id"])
            conn.send(("failed", task["id"], f"internal error in the job worker ({type(exc).__name__})"))


class _Worker:
    """The server side of one worker process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child,), name="medseg-job-worker", daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()


# ----------------------------------------------------------------------------------------------- manager


class JobManager:
    """Accepts jobs into the store and runs them one at a time in the worker process.

    Args:
        settings: ``data_dir`` (store, job files), ``max_queue``, ``job_timeout_s``, ``device``, ``models_dir``,
            ``model_version``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.data_dir / "jobs"
        self._store: JobStore | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._worker: _Worker | None = None

    # -- lifecycle

    def start(self) -> None:
        """Open the store, recover jobs a killed server left behind, start the dispatcher thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = JobStore(self.settings.jobs_db)
        requeued, failed = self._store.recover()
        if requeued or failed:
            logger.warning("job recovery: %d re-queued, %d failed (%s)", requeued, failed, RESTART_REASON)
        self._stop.clear()
        self._thread = threading.Thread(target=self._dispatch, name="medseg-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the dispatcher and the worker; a running job goes back to the queue for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise ApiError(503, "NotReady", "the job store is not open", headers={"Retry-After": "5"})
        return self._store

    # -- API

    def queue_full(self) -> ApiError:
        return ApiError(
            503,
            "QueueFull",
            f"{self.settings.max_queue} jobs are queued or running, the limit of this server",
            hint="retry after the time in Retry-After, or raise max_queue in the server settings",
            headers={"Retry-After": "10"},
        )

    def check_capacity(self) -> None:
        """503 + ``Retry-After`` when the queue is full (cheap pre-check before receiving an upload)."""
        if self.store.active_count() >= self.settings.max_queue:
            raise self.queue_full()

    def submit(
        self,
        model_name: str,
        input_path: Path,
        output: OutputFormat | str = OutputFormat.nifti,
        tta: bool | None = None,
        *,
        model_dir: Path | None = None,
        stem: str = "image",
        prompts: dict[str, Any] | None = None,
    ) -> str:
        """Queue a job; takes ownership of ``input_path`` (moved into the job folder). Returns the job id.

        Args:
            model_name: served model name.
            input_path: an image file or a DICOM series folder (already validated by the caller).
            output: result format.
            tta: flip TTA override (None: the run's setting).
            model_dir: the model's folder (default ``settings.models_dir / model_name``).
            stem: base of the result's download name.
            prompts: JSON form of the prompts of a prompted model (kept beside the input as ``prompts.json``).

        Raises:
            ApiError: 503 + ``Retry-After`` when ``max_queue`` jobs are queued or running.
        """
        output = OutputFormat(output)
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(parents=True)
        src = Path(input_path)
        suffix = "" if src.is_dir() else ".nii.gz" if src.name.lower().endswith(".nii.gz") else src.suffix
        target = folder / f"input{suffix}"
        shutil.move(str(src), target)
        if prompts is not None:
            with atomic_open(folder / PROMPTS_FILE) as fh:
                json.dump(prompts, fh)
        job = Job(
            id=job_id,
            model=model_name,
            model_dir=str(model_dir if model_dir is not None else self.settings.models_dir / model_name),
            state=JobState.queued.value,
            progress=0.0,
            output=output.value,
            tta=tta,
            stem=stem,
            created=time.time(),
            started=None,
            finished=None,
            attempts=0,
            error=None,
            input_path=str(target),
            result_path=None,
            label_names=None,
        )
        if not self.store.insert_if_room(job, self.settings.max_queue):
            shutil.rmtree(folder, ignore_errors=True)
            raise self.queue_full()
        logger.info("job %s queued: model %s, output %s", job_id, model_name, output.value)
        self._wake.set()
        return job_id

    def get(self, job_id: str) -> Job:
        """The job or a 404."""
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, "NotFound", f"no job with id {job_id!r}", hint="ids come from POST /v1/jobs")
        return job

    def result_path(self, job_id: str) -> Path:
        """The result file of a ``done`` job; 409 while it is not done."""
        job = self.get(job_id)
        if job.state != JobState.done.value or not job.result_path:
            reason = f": {job.error}" if job.error else ""
            raise ApiError(
                409,
                "JobNotDone",
                f"job {job_id} is {job.state}{reason}",
                hint="poll GET /v1/jobs/{id} until its state is done" if job.state in ACTIVE else None,
            )
        return Path(job.result_path)

    def cancel(self, job_id: str) -> str:
        """Cancel a queued/running job (``"cancelled"``) or delete a finished one with its files (``"deleted"``)."""
        job = self.get(job_id)
        now = time.time()
        cancelled = JobState.cancelled.value
        if job.state == JobState.queued.value and self.store.transition(
            job_id, job.state, state=cancelled, finished=now
        ):
            return cancelled
        if job.state == JobState.running.value:
            with self._cancel_lock:
                self._cancel.add(job_id)
            if self.store.transition(job_id, job.state, state=cancelled, finished=now, error="cancelled by request"):
                self._wake.set()
                return cancelled
            with self._cancel_lock:
                self._cancel.discard(job_id)
        job = self.get(job_id)
        if job.state in ACTIVE:  # it changed state under us; let the client retry
            raise ApiError(409, "Conflict", f"job {job_id} changed state while being cancelled", hint="retry")
        self.store.delete(job_id)
        shutil.rmtree(self.root / job_id, ignore_errors=True)
        return "deleted"

    # -- dispatcher thread

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.next_queued()
                if job is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._execute(job)
            except Exception:  # keep dispatching; the failing job is marked failed by _execute where possible
                logger.exception("job dispatcher error")
                time.sleep(1.0)

    def _cancelled(self, job_id: str) -> bool:
        with self._cancel_lock:
            if job_id in self._cancel:
                self._cancel.discard(job_id)
                return True
        return False

    def _discard_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def _fail(self, job: Job, reason: str) -> None:
        logger.warning("job %s failed: %s", job.id, reason)
        self.store.transition(
            job.id, JobState.running.value, state=JobState.failed.value, error=reason, finished=time.time()
        )

    def _worker_ready(self, job: Job) -> bool:
        """Start the worker if needed and wait for its 'ready'; False when stopping, cancelled or it failed."""
        if self._worker is not None and not self._worker.process.is_alive():
            self._discard_worker()
        if self._worker is None:
            self._worker = _Worker()
        worker = self._worker
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not worker.ready:
            if self._stop.is_set() or self._cancelled(job.id):
                return False
            try:
                if worker.conn.poll(_POLL_S):
                    worker.ready = worker.conn.recv()[0] == "ready"
                    continue
            except (EOFError, OSError):
                pass
            if not worker.process.is_alive() or time.monotonic() > deadline:
                self._discard_worker()
                self._fail(job, "the job worker process failed to start")
                return False
        return True

    def _execute(self, job: Job) -> None:
        running = JobState.running.value
        if not self.store.transition(job.id, JobState.queued.value, state=running, started=time.time(), progress=0.0):
            return
        self.store.add_attempts(job.id, 1)
        if not self._worker_ready(job):
            if self._stop.is_set():
                self._requeue(job)
            return
        worker = self._worker
        if worker is None:  # not reachable: _worker_ready returned True
            return
        suffix = OUTPUTS[OutputFormat(job.output)].suffix
        task = {
            "id": job.id,
            "model": job.model,
            "model_dir": job.model_dir,
            "input_path": job.input_path,
            "output": job.output,
            "tta": job.tta,
            "result_path": str(self.root / job.id / f"result{suffix}"),
            "device": self.settings.device,
            "model_version": self.settings.model_version,
        }
        worker.conn.send(task)
        timeout = self.settings.job_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            if self._stop.is_set():
                self._discard_worker()
                self._requeue(job)
                return
            if self._cancelled(job.id):
                logger.info("job %s cancelled while running: worker killed", job.id)
                self._discard_worker()
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard_worker()
                self._fail(job, f"timed out after {timeout:g} s")
                return
            try:
                message = worker.conn.recv() if worker.conn.poll(min(_POLL_S, remaining)) else None
            except (EOFError, OSError):
                message = None
            if message is None:
                if not worker.process.is_alive():
                    code = worker.process.exitcode
                    self._discard_worker()
                    self._fail(job, f"the job worker process died (exit code {code})")
                    return
                continue
            kind = message[0]
            if kind == "progress":
                self.store.transition(job.id, running, progress=float(message[2]))
            elif kind == "done":
                done = JobState.done.value
                self.store.transition(
                    job.id,
                    running,
                    state=done,
                    progress=1.0,
                    finished=time.time(),
                    result_path=message[2],
                    label_names=json.dumps(message[3]),
                )
                logger.info("job %s done", job.id)
                return
            elif kind == "failed":
                self._fail(job, str(message[2]))
                return

    def _requeue(self, job: Job) -> None:
        """Back to the queue after a graceful stop; the interrupted attempt does not count."""
        if self.store.transition(job.id, JobState.running.value, state=JobState.queued.value, progress=0.0):
            self.store.add_attempts(job.id, -1)
