"""The persistent job store: one row per job, guarded state transitions, leases, crash recovery (see
:mod:`server.jobs`).

:class:`JobStoreBase` is the contract and holds the SQL; a backend supplies a connection and a few dialect words.
:class:`JobStore` is SQLite (the embedded single-machine default); :class:`server.jobs.pg_store.PgJobStore` is
PostgreSQL, shared by several server replicas. :func:`open_job_store` picks one from the settings.

**Leases.** :meth:`JobStoreBase.claim` moves the oldest claimable job to ``running`` and gives it a lease: the
claiming replica's id (``lease_owner``) and an expiry (``lease_expires``, Unix seconds on the *database's* clock, so
replicas on machines with skewed clocks agree). A job is claimable when it is ``queued``, or ``running`` with an
expired (or missing) lease: its replica stopped renewing it, so it is presumed dead. Each claim counts an attempt; an
expired job that already had :data:`MAX_ATTEMPTS` attempts is ``failed`` instead. The running replica renews the lease
(:meth:`JobStoreBase.renew`); a renewal that changes no row tells it that the job was cancelled (on any replica) or
taken over, so it stops the work. Finishing (:meth:`JobStoreBase.finish`) is guarded by the owner as well, so a
replica that lost its lease cannot overwrite the result of the one that took the job over.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from server.schemas import JobState

if TYPE_CHECKING:
    from server.settings import Settings

ACTIVE = (JobState.queued.value, JobState.running.value)
RESTART_REASON = "server restarted during the job"
LEASE_REASON = "the server running the job stopped renewing its lease"
PROMPTS_FILE = "prompts.json"
#: A job is failed instead of being claimed again once it has been started this many times.
MAX_ATTEMPTS = 2

_COLUMNS = """
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    model_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    progress {float} NOT NULL DEFAULT 0,
    output TEXT NOT NULL,
    tta INTEGER,
    stem TEXT NOT NULL,
    created {float} NOT NULL,
    started {float},
    finished {float},
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    input_path TEXT NOT NULL,
    result_path TEXT,
    label_names TEXT,
    lease_owner TEXT,
    lease_expires {float}
"""
#: Columns added after the first release; an older SQLite file gets them on open.
_LEASE_COLUMNS = {"lease_owner": "TEXT", "lease_expires": "REAL"}


def schema(float_type: str) -> str:
    """The ``jobs`` table and its index, with ``float_type`` for times and progress."""
    return (
        f"CREATE TABLE IF NOT EXISTS jobs ({_COLUMNS.format(float=float_type)});\n"
        "CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);"
    )


@dataclass(frozen=True)
class Job:
    """One row of the job store (times are Unix seconds).

    ``input_path`` and ``result_path`` are relative to the jobs folder (``settings.jobs_dir``) shared by the replicas
    (older rows hold absolute paths; joining an absolute path to the folder keeps it unchanged).
    """

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
    lease_owner: str | None = None
    lease_expires: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
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


class Cursor(Protocol):
    """What the store needs of a DB-API cursor (``sqlite3`` and ``psycopg`` both fit)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


class JobStoreBase(ABC):
    """The job table and its state machine; thread-safe (one connection behind a lock).

    SQL is written once with ``?`` placeholders and the dialect words below; a backend implements
    :meth:`_execute` (one statement, autocommit), :meth:`_transaction` (statements as one transaction) and
    :meth:`close`.
    """

    #: SQL expression for the database's current Unix time in seconds.
    NOW: str
    #: Suffix of the claim's ``SELECT``: lock the candidate row, skipping rows other replicas hold.
    SKIP_LOCKED: str = ""
    #: Two-argument maximum function.
    GREATEST: str = "MAX"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    @abstractmethod
    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor:
        """Run one statement (``?`` placeholders) in autocommit mode, under ``self._lock``."""

    @abstractmethod
    def _transaction(self, insert: bool = False) -> AbstractContextManager[None]:
        """Hold ``self._lock`` and run the block's :meth:`_execute` calls as one transaction. ``insert``: also
        serialise against other inserting replicas (the capacity check of :meth:`insert_if_room`)."""

    @abstractmethod
    def close(self) -> None: ...

    def _row(self, sql: str, params: tuple[Any, ...] = ()) -> Job | None:
        row = self._execute(sql, params).fetchone()
        return None if row is None else Job.from_row(row)

    # -- submission and reads

    def insert_if_room(self, job: Job, max_active: int) -> bool:
        """Insert ``job`` unless ``max_active`` jobs are queued/running (over all replicas); one transaction."""
        row = asdict(job)
        row["tta"] = None if job.tta is None else int(job.tta)
        cols = ", ".join(row)
        with self._transaction(insert=True):
            (active,) = _values(self._execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone())
            if active >= max_active:
                return False
            self._execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            return True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._row("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def active_count(self) -> int:
        with self._lock:
            row = self._execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
        return int(_values(row)[0])

    def next_queued(self) -> Job | None:
        """The oldest ``queued`` job (read only; :meth:`claim` is what takes one)."""
        with self._lock:
            return self._row("SELECT * FROM jobs WHERE state = ? ORDER BY created LIMIT 1", (JobState.queued.value,))

    # -- leases

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the oldest claimable job for ``owner``: ``running``, one more attempt, a lease of ``lease_s``.

        Claimable: ``queued``, or ``running`` with an expired or missing lease. An expired job that already had
        :data:`MAX_ATTEMPTS` attempts is ``failed`` (:data:`LEASE_REASON`) and the next candidate is tried.
        Returns the claimed job, or None when there is none.
        """
        running = JobState.running.value
        select = (
            f"SELECT id, attempts, state FROM jobs WHERE state = ? OR (state = ? AND "
            f"(lease_expires IS NULL OR lease_expires < {self.NOW})) ORDER BY created LIMIT 1{self.SKIP_LOCKED}"
        )
        with self._transaction():
            while True:
                row = self._execute(select, (JobState.queued.value, running)).fetchone()
                if row is None:
                    return None
                job_id, attempts, state = _values(row)
                if state == running and attempts >= MAX_ATTEMPTS:
                    self._execute(
                        "UPDATE jobs SET state = ?, error = ?, finished = ?, lease_expires = NULL WHERE id = ?",
                        (JobState.failed.value, LEASE_REASON, time.time(), job_id),
                    )
                    continue
                self._execute(
                    f"UPDATE jobs SET state = ?, started = ?, progress = 0, attempts = attempts + 1, "
                    f"lease_owner = ?, lease_expires = {self.NOW} + ? WHERE id = ?",
                    (running, time.time(), owner, float(lease_s), job_id),
                )
                return self._row("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def renew(self, job_id: str, owner: str, lease_s: float, progress: float | None = None) -> bool:
        """Extend ``owner``'s lease on a running job (and set its progress); False when the job is no longer
        running under that lease: cancelled, finished, or claimed by another replica after the lease expired."""
        sets = f"lease_expires = {self.NOW} + ?" + ("" if progress is None else ", progress = ?")
        params: tuple[Any, ...] = (float(lease_s),) if progress is None else (float(lease_s), float(progress))
        with self._lock:
            cur = self._execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND state = ? AND lease_owner = ?",
                (*params, job_id, JobState.running.value, owner),
            )
        return cur.rowcount == 1

    def finish(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Set ``fields`` (e.g. ``state="done"``) on a job ``owner`` runs under its lease; True when a row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            cur = self._execute(
                f"UPDATE jobs SET {sets}, lease_expires = NULL WHERE id = ? AND state = ? AND lease_owner = ?",
                (*fields.values(), job_id, JobState.running.value, owner),
            )
        return cur.rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        """Back to the queue after a graceful stop of ``owner``: the interrupted attempt does not count."""
        with self._lock:
            cur = self._execute(
                f"UPDATE jobs SET state = ?, progress = 0, attempts = {self.GREATEST}(0, attempts - 1), "
                "lease_owner = NULL, lease_expires = NULL WHERE id = ? AND state = ? AND lease_owner = ?",
                (JobState.queued.value, job_id, JobState.running.value, owner),
            )
        return cur.rowcount == 1

    def recover(self, owner: str | None = None) -> tuple[int, int]:
        """At start-up: ``running`` jobs whose lease is expired, missing, or held by ``owner`` (this replica in an
        earlier life) go back to the queue, or fail (:data:`RESTART_REASON`) when they already had
        :data:`MAX_ATTEMPTS` attempts. Jobs under another replica's live lease are left alone. Returns the counts
        ``(requeued, failed)``."""
        orphan = (
            "state = ? AND (lease_owner IS NULL OR lease_owner = ? OR lease_expires IS NULL "
            f"OR lease_expires < {self.NOW})"
        )
        running = JobState.running.value
        with self._transaction():
            failed = self._execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ?, lease_expires = NULL "
                f"WHERE {orphan} AND attempts >= ?",
                (JobState.failed.value, RESTART_REASON, time.time(), running, owner, MAX_ATTEMPTS),
            ).rowcount
            requeued = self._execute(
                f"UPDATE jobs SET state = ?, progress = 0, lease_owner = NULL, lease_expires = NULL WHERE {orphan}",
                (JobState.queued.value, running, owner),
            ).rowcount
        return requeued, failed

    # -- other changes

    def transition(self, job_id: str, from_state: str, **fields: Any) -> bool:
        """Set ``fields`` on ``job_id`` if it is still in ``from_state``; True when a row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            cur = self._execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND state = ?", (*fields.values(), job_id, from_state)
            )
        return cur.rowcount == 1

    def add_attempts(self, job_id: str, delta: int) -> None:
        with self._lock:
            self._execute(f"UPDATE jobs SET attempts = {self.GREATEST}(0, attempts + ?) WHERE id = ?", (delta, job_id))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def _values(row: Any) -> tuple[Any, ...]:
    """A row as a tuple, whether the driver returned a mapping (``psycopg`` dict rows) or a sequence."""
    return tuple(row.values()) if isinstance(row, Mapping) else tuple(row)


class JobStore(JobStoreBase):
    """The SQLite job table (WAL, ``synchronous=FULL``, explicit ``BEGIN IMMEDIATE`` transactions).

    One server process per file: SQLite on a shared folder is not a replica set-up (use PostgreSQL for that).
    """

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(schema("REAL"))
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _LEASE_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    @contextmanager
    def _transaction(self, insert: bool = False) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock is taken first: also serialises inserts
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def open_job_store(settings: Settings, replica_id: str) -> JobStoreBase:
    """PostgreSQL when ``settings.jobs_database_url`` is set (replicas), else SQLite at ``settings.jobs_db``.

    Args:
        settings: the server settings.
        replica_id: this replica's id (the PostgreSQL connection's ``application_name``, seen in ``pg_stat_activity``).
    """
    if settings.jobs_database_url is None:
        return JobStore(settings.jobs_db)
    from server.jobs.pg_store import PgJobStore  # psycopg is needed only for this backend

    return PgJobStore(settings.jobs_database_url.get_secret_value(), application_name=f"medseg {replica_id}")
