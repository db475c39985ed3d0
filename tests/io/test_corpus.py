"""The malformed-file corpus (:mod:`tests.corpus.malformed`) through ``load_image`` and ``read_header``.

Every malformed file must be refused with a ``DataError`` - never another exception type, never a hang (each file
runs under a time limit) - and every valid file must load, with the shape and channels its header announced.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from medseg.core.errors import DataError
from medseg.io import load_image, read_header
from tests.corpus.malformed import Case, build_corpus

PER_FILE_S = 10  # far above the slowest file (a valid DICOM zip, first ITK import: ~2 s)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn: object, case: Case) -> tuple[str, object, float]:
    """``("ok", result)``, ``("DataError", error)`` or ``("<Type>", error)`` and the seconds taken."""
    start = time.perf_counter()
    try:
        with time_limit(PER_FILE_S):
            result = fn(case.path, **case.options)  # type: ignore[operator]
    except DataError as err:
        return "DataError", err, time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any other type is the failure being looked for
        return type(exc).__name__, exc, time.perf_counter() - start
    return "ok", result, time.perf_counter() - start


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_corpus_covers_every_reader(corpus: list[Case]) -> None:
    assert len(corpus) >= 150
    formats = {c.name.split("/")[0] for c in corpus}
    assert formats == {"nifti", "nrrd", "metaimage", "dicom", "series", "zip", "raster"}
    assert {c.name.split("/")[0] for c in corpus if c.valid} == formats - {"zip"}
    assert sum(not c.valid for c in corpus) >= 150


def test_load_image_refuses_every_malformed_file_and_loads_the_valid_ones(corpus: list[Case]) -> None:
    failures, slowest = [], 0.0
    for case in corpus:
        kind, value, seconds = outcome(load_image, case)
        slowest = max(slowest, seconds)
        if case.valid:
            if kind != "ok":
                failures.append(f"{case.name}: valid file refused ({kind}: {value})")
                continue
            header = read_header(case.path, **case.options)
            if tuple(value.shape) != (header.channels, *header.shape):  # type: ignore[union-attr]
                failures.append(f"{case.name}: loaded {tuple(value.shape)}, header said {header}")  # type: ignore[union-attr]
        elif kind != "DataError":
            failures.append(f"{case.name}: {kind} {str(value)[:200]}")
        elif not str(value).strip() or "expected" not in str(value):
            failures.append(f"{case.name}: DataError without what/expected: {value}")
    assert not failures, "\n".join(failures)
    assert slowest < PER_FILE_S


def test_read_header_refuses_header_lies_without_decoding(corpus: list[Case]) -> None:
    failures = []
    for case in corpus:
        kind, value, _ = outcome(read_header, case)
        if case.valid or not case.header_refuses:
            if kind not in ("ok", "DataError") or (case.valid and kind != "ok"):
                failures.append(f"{case.name}: {kind} {str(value)[:200]}")
        elif kind != "DataError":
            failures.append(f"{case.name}: header lie not refused ({kind} {str(value)[:200]})")
    assert not failures, "\n".join(failures)


def test_nonfinite_zero_replaces_nan_and_inf(corpus: list[Case]) -> None:
    nonfinite = [c for c in corpus if c.name.split("/")[1].startswith(("voxels-", "tiff-float-"))]
    assert len(nonfinite) >= 5
    for case in nonfinite:
        with pytest.raises(DataError, match="non-finite voxel values"):
            load_image(case.path)
        image = load_image(case.path, nonfinite="zero")
        assert bool(np.isfinite(image.numpy()).all()), case.name


def test_corpus_script_writes_the_same_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.corpus.malformed import main

    assert main([str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith("valid)") and int(lines[-1].split()[0]) >= 150
