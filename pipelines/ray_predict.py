"""``medseg predict ... --ray``: batch prediction over a Ray Data pipeline of cases, one predictor per worker.

Ray (``pip install 'medseg[ray]'``) is imported only here. Without ``--ray-address`` a local Ray instance is started
for the batch (``--ray-workers`` CPUs) and shut down after it; with an address the cases run on that cluster, whose
nodes must see the run directory, the inputs and ``--out`` at the same paths (shared storage).

Each worker is a Ray actor that opens the model once (:func:`medseg.open_predictor`, one torch thread per CPU it
was given) and predicts one case per call with :func:`pipelines.predict.predict_case`, so outputs are the same files,
written the same atomic way, as a single-process run. Results stream back as cases finish (a progress bar on the
driver). A case that fails is recorded with its error and never stops the batch; ``<out>/batch_report.json`` lists
what was written, skipped and failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.core.atomic import atomic_open
from medseg.core.errors import ConfigError, MedsegError
from pipelines.batch import list_cases, shard
from pipelines.predict import PredictSettings, predict_case

logger = logging.getLogger(__name__)

__all__ = ["BatchReport", "predict_with_ray"]

REPORT_NAME = "batch_report.json"


@dataclass
class BatchReport:
    """What a batch did, case by case."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": self.skipped, "failed": self.failed, "seconds": self.seconds}


class _CaseWorker:
    """A Ray Data actor: one opened predictor, one case per row (``batch_size=1``)."""

    def __init__(self, run: str, out: str, settings: PredictSettings, device: str, threads: int) -> None:
        import torch

        from medseg import open_predictor

        torch.set_num_threads(max(1, threads))
        self.predictor = open_predictor(Path(run), device=device, **settings.open_options())
        self.out, self.settings = Path(out), settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        paths, states, errors = [], [], []
        for raw in batch["path"]:
            path = Path(str(raw))
            try:
                case = predict_case(self.predictor, path, self.out, self.settings)
                state, error = ("written" if case is not None else "skipped"), ""
            except MedsegError as err:
                state, error = "failed", f"{type(err).__name__}: {err.message}"
            except Exception as exc:  # noqa: BLE001 - one broken case must not stop the batch; it is reported
                logger.exception("case %s failed", path)
                state, error = "failed", f"{type(exc).__name__}: {exc}"
            paths.append(str(path))
            states.append(state)
            errors.append(error)
        return {"path": paths, "state": states, "error": errors}


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--ray needs Ray (with Ray Data), which is not installed",
            hint="pip install 'medseg[ray]' (or pip install 'ray[data]'), or drop --ray",
        ) from None
    return ray


def predict_with_ray(
    run: Path,
    inputs: list[Path],
    out: Path,
    settings: PredictSettings | None = None,
    *,
    address: str | None = None,
    workers: int = 2,
    device: str = "cpu",
    show_progress: bool = False,
) -> BatchReport:
    """Predict every case of ``inputs`` (or this process's part of them) on Ray, ``workers`` predictors at a time.

    Args:
        run: the model folder (every worker opens it).
        inputs: images, DICOM folders, zips or folders of them (:func:`pipelines.batch.list_cases`).
        out: output folder (shared by all workers).
        settings: as for :func:`pipelines.predict.predict`.
        address: a running Ray cluster (``ray://...`` or ``host:port``); ``None`` starts a local instance.
        workers: predictor actors (one CPU each).
        device: device of each predictor.
        show_progress: a progress bar over finished cases.

    Returns:
        The report also written to ``<out>/batch_report.json``.

    Raises:
        ConfigError: Ray is not installed, or ``workers < 1``.
    """
    s = settings or PredictSettings()
    if workers < 1:
        raise ConfigError(f"--ray-workers {workers}", expected="an integer >= 1")
    cases = shard(list_cases(inputs), s.num_parts, s.part_id)
    from medseg import open_predictor

    open_predictor(run, device="cpu").check_prompts(s.prompts)  # a bad model folder or prompts fail before Ray starts
    out.mkdir(parents=True, exist_ok=True)
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        ray.init(address=address, **({} if address else {"num_cpus": workers}), **kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's own per-10-s progress lines
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one bar over cases instead
    report = BatchReport()
    start = time.perf_counter()
    try:
        dataset = ray.data.from_items([{"path": str(p)} for p in cases], override_num_blocks=max(1, len(cases)))
        results = dataset.map_batches(
            _CaseWorker,
            fn_constructor_kwargs={
                "run": str(run),
                "out": str(out),
                "settings": s,
                "device": device,
                "threads": 1,
            },
            batch_size=1,
            concurrency=workers,
            num_cpus=1,
        )
        for row in _progress(results.iter_rows(), len(cases), show_progress):
            state, path = row["state"], row["path"]
            if state == "failed":
                report.failed[path] = row["error"]
                logger.error("%s failed: %s", path, row["error"])
            else:
                (report.written if state == "written" else report.skipped).append(path)
    finally:
        if started_here:
            ray.shutdown()
    report.seconds = round(time.perf_counter() - start, 2)
    report.written.sort()
    report.skipped.sort()
    with atomic_open(out / REPORT_NAME) as fh:
        json.dump(report.to_dict(), fh, indent=2)
    return report


def _progress(rows: Iterator[dict[str, Any]], total: int, enabled: bool) -> Iterator[dict[str, Any]]:
    if not enabled or total < 2:
        yield from rows
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("predicting (ray)", total=total)
        for row in rows:
            bar.advance(task)
            yield row
