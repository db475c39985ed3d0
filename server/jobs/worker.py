"""The job worker process: opens each model once with :func:`medseg.open_predictor`, runs one task at a time and
reports progress over a pipe; and the server-side handle that starts and kills it (see :mod:`server.jobs`)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.errors import ApiError
from server.jobs.store import PROMPTS_FILE
from server.schemas import OutputFormat

#: Beside a job's input: the options of a whole-slide job (its presence makes the job a slide job).
SLIDE_FILE = "slide.json"
#: Folder (beside the input) holding a slide job's outputs; ``result.zip`` holds the same files.
SLIDE_RESULT_DIR = "slide"


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
    from medseg import open_predictor
    from medseg.inference.prompts import Prompts
    from medseg.io import load_image
    from server.results import write_result

    job_id = task["id"]
    conn.send(("progress", job_id, 0.05))
    model = cache.get(task["model_dir"])
    if model is None:
        model = cache[task["model_dir"]] = open_predictor(Path(task["model_dir"]), device=task["device"])
    conn.send(("progress", job_id, 0.3))
    source = Path(task["input_path"])
    if (source.parent / SLIDE_FILE).is_file():
        return _run_slide(task, model, source, conn)
    image = load_image(source)
    conn.send(("progress", job_id, 0.4))
    prompts_file = source.parent / PROMPTS_FILE
    prompts = Prompts.from_json(json.loads(prompts_file.read_text())) if prompts_file.is_file() else None
    reported = [0.4]

    def advance(done: int, total: int) -> None:  # windows (or slices) done: 0.4 .. 0.9, at most every 5 %
        value = 0.4 + 0.5 * done / max(total, 1)
        if value - reported[0] >= 0.05 or done == total:
            reported[0] = value
            conn.send(("progress", job_id, round(value, 3)))

    if model.task == "classification":  # one class per image: the JSON the synchronous endpoint answers
        result = Path(task["result_path"]).with_suffix(".json")
        result.write_text(json.dumps(model.predict_class(image, prompts=prompts).to_dict()))
        return str(result), list(model.label_names)
    prediction = model.predict(image, tta=task["tta"], prompts=prompts, progress=advance)
    conn.send(("progress", job_id, 0.9))
    path = write_result(
        prediction,
        OutputFormat(task["output"]),
        source if source.is_dir() or source.suffix == ".dcm" else None,  # a series folder, or an XA / US file
        Path(task["result_path"]),
        model_name=task["model"],
        model_version=task["model_version"],
    )
    return str(path), list(prediction.label_names)


def _run_slide(task: dict[str, Any], model: Any, source: Path, conn: Connection) -> tuple[str, list[str]]:
    """A whole-slide job: the CLI's slide path (:func:`medseg.data.slide_inference.predict_slide_file`) into
    ``slide/`` beside the input, then ``result.zip`` of those files (the job's result)."""
    import shutil
    import zipfile

    from medseg.data.slide_inference import predict_slide_file

    job_id = task["id"]
    options = json.loads((source.parent / SLIDE_FILE).read_text())
    reported = [0.3]

    def advance(done: int, total: int) -> None:  # tiles done: 0.3 .. 0.9, at most every 5 %
        value = 0.3 + 0.6 * done / max(total, 1)
        if value - reported[0] >= 0.05 or done == total:
            reported[0] = value
            conn.send(("progress", job_id, round(value, 3)))

    folder = source.parent / SLIDE_RESULT_DIR
    shutil.rmtree(folder, ignore_errors=True)  # a retried job starts clean
    result = predict_slide_file(
        model, source, folder, target_mpp=options.get("target_mpp"), slide_mpp=options.get("slide_mpp"),
        progress=advance,
    )  # fmt: skip
    summary = {**result.to_dict(), "files": {k: p.name for k, p in result.files.items()}}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    archive = source.parent / "result.zip"
    partial = archive.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    partial.replace(archive)
    return str(archive), list(result.label_names)


def _public(reason: str, task: dict[str, Any]) -> str:
    """A failure reason without server paths: the job folder and the model folder are replaced by short names."""
    job_dir = str(Path(task["input_path"]).parent)
    return reason.replace(job_dir + os.sep, "").replace(job_dir, "job").replace(task["model_dir"], task["model"])


def worker_main(conn: Connection, threads: int | None = None) -> None:
    """Entry point of the worker process: report ready (with its torch thread count), then run tasks from ``conn``
    until EOF or ``None``. ``threads`` sets torch's intra-op threads (``None``: torch's default, every core)."""
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s medseg-worker %(levelname)s %(message)s")
    import torch

    import medseg.api  # noqa: F401  (torch, monai and medseg imported once, before the first job)
    import server.results  # noqa: F401
    from medseg.core.errors import MedsegError

    if threads is not None:  # replicas sharing a machine split its cores instead of each taking all of them
        torch.set_num_threads(threads)
    conn.send(("ready", os.getpid(), torch.get_num_threads()))
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


class Worker:
    """The server side of one worker process (``threads``: its torch threads, ``None`` for torch's default)."""

    def __init__(self, threads: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.threads = threads
        self.process = ctx.Process(target=worker_main, args=(child, threads), name="medseg-job-worker", daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
