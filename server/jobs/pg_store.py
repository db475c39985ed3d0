"""The PostgreSQL job store, shared by several server replicas (``settings.jobs_database_url``).

The state machine, the leases and every statement are :class:`server.jobs.store.JobStoreBase`'s; this backend adds
a ``psycopg`` 3 connection (autocommit, dict rows) and three dialect words:

* the claim's candidate ``SELECT`` ends in ``FOR UPDATE SKIP LOCKED``: a replica locks the row it is about to claim
  and other replicas skip it instead of waiting, so concurrent claims never block each other and never return the
  same job;
* times come from the server's ``clock_timestamp()``, so leases do not depend on the replicas' clocks agreeing;
* submissions take a transaction-scoped advisory lock, so the ``max_queue`` check and the insert are atomic over
  all replicas (``COUNT(*)`` alone would let two replicas both see room for the last place).

The table is created on first use (under an advisory lock: replicas may start together). When the database cannot
be reached an operation raises :class:`server.errors.ApiError` 503 with ``Retry-After``; the next one reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from server.errors import ApiError
from server.jobs.store import Cursor, JobStoreBase, schema

logger = logging.getLogger("server")

#: Advisory lock keys (any two fixed 64-bit numbers; other applications on the database would need other ones).
_SCHEMA_LOCK = 0x6D65_6473_6567_0001
_INSERT_LOCK = 0x6D65_6473_6567_0002
CONNECT_TIMEOUT_S = 10


class PgJobStore(JobStoreBase):
    """The job table in PostgreSQL (one connection behind the store's lock; reconnects after a failure).

    Args:
        url: libpq connection URL, ``postgresql://user:password@host:5432/database``.
        application_name: shown in ``pg_stat_activity`` (the replica id).

    Raises:
        ApiError: 503 when the database cannot be reached.
    """

    NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    GREATEST = "GREATEST"

    def __init__(self, url: str, application_name: str = "medseg") -> None:
        super().__init__()
        self._url = url
        self._application_name = application_name[:63]
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._depth = 0  # open transactions (under the lock): never reconnect inside one
        with self._transaction():
            self._execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in schema("DOUBLE PRECISION").split(";"):
                if statement.strip():
                    self._execute(statement)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        conn = self._conn
        if conn is not None and self._depth:
            return conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = conn = psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=dict_row,
                application_name=self._application_name,
                connect_timeout=CONNECT_TIMEOUT_S,
            )
        return conn

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Map a lost or refused connection to a 503 (the message names no host, user or password)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            logger.warning("job database unavailable: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
            raise ApiError(
                503,
                "StoreUnavailable",
                "the job database cannot be reached",
                hint="retry after the time in Retry-After; check jobs_database_url and that PostgreSQL runs",
                headers={"Retry-After": "5"},
            ) from None

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor:
        with self._lock, self._unavailable():
            return self._connection().execute(sql.replace("?", "%s"), params)

    @contextmanager
    def _transaction(self, insert: bool = False) -> Iterator[None]:
        with self._lock, self._unavailable(), self._connection().transaction():
            self._depth += 1
            try:
                if insert:
                    self._connection().execute("SELECT pg_advisory_xact_lock(%s)", (_INSERT_LOCK,))
                yield
            finally:
                self._depth -= 1
