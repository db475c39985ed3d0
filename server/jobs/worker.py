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

    prediction = model.predict(image, tta=task["tta"], prompts=prompts, progress=advance)
    conn.send(("progress", job_id, 0.9))
    path = write_result(
        prediction,
        OutputFormat(task["output"]),
        source if source.is_dir() else None,
        Path(task["result_path"]),
        model_name=task["model"],
        model_version=task["model_version"],
    )
    return str(path), list(prediction.label_names)


def _public(reason: str, task: dict[str, Any]) -> str:
    """A failure reason without server paths: the job folder and the model folder are replaced by short names."""
    job_dir = str(Path(task["input_path"]).parent)
    return reason.replace(job_dir + os.sep, "").replace(job_dir, "job").replace(task["model_dir"], task["model"])


def worker_main(conn: Connection) -> None:
    """Entry point of the worker process: report ready, then run tasks from ``conn`` until EOF or ``None``."""
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s medseg-worker %(levelname)s %(message)s")
    import medseg.api  # noqa: F401  (torch, monai and medseg imported once, before the first job)
    import server.results  # noqa: F401
    from medseg.core.errors import MedsegError

    conn.send(("ready", os.getpid()))
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
    """The server side of one worker process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child,), name="medseg-job-worker", daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
