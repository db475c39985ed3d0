"""A throw-away PostgreSQL cluster: ``initdb`` into a temp folder, ``pg_ctl start`` on a free 127.0.0.1 port with the
unix socket in the same folder, ``pg_ctl stop`` and removal at the end. Used by the replica tests and
``benchmarks/scale.py``.

The binaries are taken from ``PATH`` or Debian's ``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run
as root, so under root the cluster belongs to the ``postgres`` user (or ``nobody``) and the commands run through
``runuser``. Authentication is ``trust`` on loopback only: the cluster is for tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "medseg"


def pg_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """A running cluster: ``url(database)`` gives a connection URL for one of its databases."""

    port: int
    root: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create a fresh database and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _runner() -> tuple[list[str], int | None, int | None]:
    """Command prefix and uid/gid to own the files: nothing special unless this process is root."""
    if os.geteuid() != 0:
        return [], None, None
    for user in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists for the test cluster")


@contextmanager
def pg_cluster(bin_dir: Path, start_timeout_s: float = 60.0) -> Iterator[PgCluster]:
    """Start a cluster in a fresh temp folder (fsync off: test data only) and stop it at the end."""
    prefix, uid, gid = _runner()
    root = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
    data, log = root / "data", root / "postgres.log"
    if uid is not None and gid is not None:
        os.chown(root, uid, gid)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"]
            + ["--locale=C", "--no-sync", "--no-instructions"],
            check=True,
            capture_output=True,
            env=env,
            timeout=start_timeout_s,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w"]
            + ["-t", str(int(start_timeout_s)), "start"],
            check=True,
            capture_output=True,
            env=env,
            timeout=start_timeout_s + 10,
        )
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"the PostgreSQL test cluster did not start: {exc.stderr!r} {tail}") from None
    try:
        yield PgCluster(port, root)
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)
