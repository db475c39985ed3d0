"""The persistent job store: one SQLite row per job, guarded state transitions, crash recovery (see
:mod:`server.jobs`)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.schemas import JobState

ACTIVE = (JobState.queued.value, JobState.running.value)
RESTART_REASON = "server restarted during the job"
PROMPTS_FILE = "prompts.json"

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
