"""Asynchronous jobs: a persistent store (SQLite, or PostgreSQL shared by replicas) and one worker process per
replica with a real per-job timeout.

Design (one module each: :mod:`server.jobs.store`, :mod:`server.jobs.worker`, :mod:`server.jobs.manager`):

* **Store** (``settings.jobs_db``, WAL, ``synchronous=FULL``): one row per job (id, model, state, progress, times,
  attempts, error, input/result paths). A job is in the store before ``POST /v1/jobs`` answers 202, so an
  accepted job survives any crash of the server. Every state change is a guarded ``UPDATE ... WHERE state = ?``, so
  a late message can never move a cancelled job back to done.
* **Worker**: one persistent process started with ``multiprocessing`` *spawn* (no forked torch/thread state) on the
  first job and kept: it imports torch once and caches each model it opens with :func:`medseg.open_predictor`
  (from the job's model folder, ``app.state.models.source[name]`` or ``settings.models_dir/name``), so a job costs
  only its inference. A
  process per job would pay ~2-5 s of imports and model loading per job; the price of reuse is that the worker holds
  its own copy of the models. Jobs run one at a time (the synchronous route runs beside them in the server process).
* **Timeout**: a dispatcher thread in the server sends a job to the worker and waits at most
  ``settings.job_timeout_s``; past it the worker is killed (SIGKILL), the job is ``failed`` with
  ``"timed out after N s"``, and a fresh worker starts for the next job. ``DELETE`` of a running job kills the worker
  the same way. The worker exits by itself when the server process dies (it watches its parent pid), so a
  ``kill -9`` of the server leaves no orphan computing.
* **Leases**: a claimed job records ``lease_owner`` (the replica) and ``lease_expires``; the running replica renews
  the lease, and any replica may claim a ``running`` job whose lease expired (counting an attempt).
* **Recovery** on start: this replica's own ``running`` jobs, jobs without a lease and jobs whose lease expired are
  re-queued once; a job that was already retried is ``failed`` with ``"server restarted during the job"``.
  ``queued`` jobs simply run. No accepted job vanishes. A graceful stop puts the running job back in the queue
  without counting the attempt.
* **Capacity**: ``submit`` refuses with 503 + ``Retry-After`` when ``settings.max_queue`` jobs are queued or
  running (checked and inserted in one ``BEGIN IMMEDIATE`` transaction).

With SQLite (the default) one server process owns ``data_dir``; with ``settings.jobs_database_url`` several replicas
share one PostgreSQL store (:mod:`server.jobs.pg_store`, claims with ``FOR UPDATE SKIP LOCKED``) and one
``shared_dir`` (``docs/distributed.md``).

Files: ``data_dir/jobs/<id>/input...`` (the upload: an image file or an extracted DICOM series folder) and
``data_dir/jobs/<id>/result.<ext>``; ``DELETE`` of a finished job removes the row and the folder.
"""

from server.jobs.manager import JobManager
from server.jobs.store import ACTIVE, PROMPTS_FILE, RESTART_REASON, Job, JobStore

__all__ = ["ACTIVE", "PROMPTS_FILE", "RESTART_REASON", "Job", "JobManager", "JobStore"]
