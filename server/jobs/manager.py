"""``JobManager``: accepts jobs into the store and runs them one at a time in the worker process, with a real
per-job timeout (see :mod:`server.jobs`)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from medseg.core.atomic import atomic_open
from server.errors import ApiError
from server.jobs.store import ACTIVE, PROMPTS_FILE, RESTART_REASON, Job, JobStoreBase, open_job_store
from server.jobs.worker import SLIDE_FILE, Worker
from server.results import OUTPUTS
from server.schemas import JobState, OutputFormat
from server.settings import Settings

logger = logging.getLogger("server")

#: How long a fresh worker may take to import torch and report ready.
WORKER_START_TIMEOUT_S = 300.0
_POLL_S = 0.1


def heartbeat_s(lease_s: float) -> float:
    """How often a running job's lease is renewed (and a cancel on another replica noticed): a third of the lease,
    at most 2 s."""
    return min(lease_s / 3.0, 2.0)


class JobManager:
    """Accepts jobs into the store and runs them one at a time in the worker process.

    Args:
        settings: ``data_dir`` (store, job files), ``max_queue``, ``job_timeout_s``, ``device``, ``models_dir``,
            ``model_version``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.jobs_dir
        self.replica_id = settings.new_replica_id()
        self._lease_s = settings.job_lease_s
        self._heartbeat_s = heartbeat_s(settings.job_lease_s)
        self._store: JobStoreBase | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._worker: Worker | None = None

    # -- lifecycle

    def start(self) -> None:
        """Open the store, recover jobs a killed server left behind, start the dispatcher thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = open_job_store(self.settings, self.replica_id)
        requeued, failed = self._store.recover(self.replica_id)  # expired leases and this replica's own only
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
    def store(self) -> JobStoreBase:
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
        slide: dict[str, Any] | None = None,
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
            slide: a whole-slide job's options (``target_mpp``, ``slide_mpp``; kept beside the input as
                ``slide.json``): the worker predicts the slide tile by tile and stores its outputs as a zip.

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
        if slide is not None:
            with atomic_open(folder / SLIDE_FILE) as fh:
                json.dump(slide, fh)
        model_dir = model_dir if model_dir is not None else self.settings.models_dir / model_name
        job = Job(
            id=job_id,
            model=model_name,
            model_dir=_relative(model_dir, self.settings.models_dir),
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
            input_path=_relative(target, self.root),  # replicas may mount the shared folder elsewhere
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
        return self.root / job.result_path

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
            mine = job.lease_owner == self.replica_id  # another replica's job stops at its next heartbeat
            with self._cancel_lock:
                if mine:
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
                job = self.store.claim(self.replica_id, self._lease_s)
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
        self.store.finish(job.id, self.replica_id, state=JobState.failed.value, error=reason, finished=time.time())

    def _lease_held(self, job: Job, beat: list[float], progress: float | None = None) -> bool:
        """Renew the job's lease when due (every ``heartbeat_s``) or with a progress value. False when the row is
        no longer this replica's running job: cancelled on any replica, or taken over after the lease expired."""
        now = time.monotonic()
        if progress is None and now < beat[0]:
            return True
        beat[0] = now + self._heartbeat_s
        try:
            if self.store.renew(job.id, self.replica_id, self._lease_s, progress):
                return True
            current = self.store.get(job.id)
        except Exception:  # the store is unreachable for a moment: keep working; the lease decides later
            logger.warning("job %s: lease renewal failed", job.id, exc_info=True)
            return True
        if current is not None and current.state == JobState.cancelled.value:
            logger.info("job %s cancelled while running: worker killed", job.id)
        else:
            logger.warning("job %s is no longer held by this replica (lease lost): worker killed", job.id)
        return False

    def _worker_ready(self, job: Job) -> bool:
        """Start the worker if needed and wait for its 'ready'; False when stopping, cancelled or it failed."""
        if self._worker is not None and not self._worker.process.is_alive():
            self._discard_worker()
        if self._worker is None:
            self._worker = Worker(threads=self.settings.worker_threads)
        worker = self._worker
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        beat = [time.monotonic() + self._heartbeat_s]
        while not worker.ready:
            if self._stop.is_set() or self._cancelled(job.id) or not self._lease_held(job, beat):
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
        """Run a job :meth:`JobStoreBase.claim` gave this replica (``running``, attempt counted, lease held)."""
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
            "model_dir": str(self.settings.models_dir / job.model_dir),
            "input_path": str(self.root / job.input_path),
            "output": job.output,
            "tta": job.tta,
            "result_path": str(self.root / job.id / f"result{suffix}"),
            "device": self.settings.device,
            "model_version": self.settings.model_version,
        }
        worker.conn.send(task)
        timeout = self.settings.job_timeout_s
        deadline = time.monotonic() + timeout
        beat = [time.monotonic() + self._heartbeat_s]
        while True:
            if self._stop.is_set():
                self._discard_worker()
                self._requeue(job)
                return
            if self._cancelled(job.id):
                logger.info("job %s cancelled while running: worker killed", job.id)
                self._discard_worker()
                return
            if not self._lease_held(job, beat):
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
                if not self._lease_held(job, beat, float(message[2])):
                    self._discard_worker()
                    return
            elif kind == "done":
                self.store.finish(
                    job.id,
                    self.replica_id,
                    state=JobState.done.value,
                    progress=1.0,
                    finished=time.time(),
                    result_path=_relative(Path(message[2]), self.root),
                    label_names=json.dumps(message[3]),
                )
                logger.info("job %s done", job.id)
                return
            elif kind == "failed":
                self._fail(job, str(message[2]))
                return

    def _requeue(self, job: Job) -> None:
        """Back to the queue after a graceful stop; the interrupted attempt does not count."""
        self.store.release(job.id, self.replica_id)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside it (rows stay valid where replicas mount ``root``
    elsewhere), else the path unchanged."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
