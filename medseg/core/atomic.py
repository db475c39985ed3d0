"""Crash-safe file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; when the block succeeds, fsync it and move it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` in a temporary folder beside ``path``, then move what it wrote into place.

    For libraries that write by file name. Companion files (``.raw`` of a ``.mhd``, ``.raw.gz`` of a ``.nhdr``)
    are moved before the file named ``path``, so a header never points at data that is not there yet.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmpdir / path.name)
        for produced in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
