"""Scaling benchmark on one machine: batch inference throughput (1 process, 2 shards, Ray with 2 workers) and
asynchronous jobs per minute with 1 and with 2 server replicas on one PostgreSQL job store, with job latency and the
claim latency.

**Batch inference** (:mod:`benchmarks.scale_batch`): ``--cases`` demo brain subjects (197x233x189 at 1 mm, made with
:func:`medseg.data.demo_brain.write_demo_dataset`) predicted by the run directory ``--run`` (default ``runs/demo``,
written by ``medseg demo``; when it is missing the tiny test model is trained and used instead, and the report says
so), each mode a fresh ``python -m pipelines.cli predict`` subprocess tree: 1 process with every core; 2 shards
started together, each with ``OMP_NUM_THREADS`` = cores / 2; ``--ray --ray-workers 2`` on a local Ray instance
(``num_cpus`` = 2, one torch thread per worker; ``--ray-cases`` limits its cases). Cases per minute, wall time,
per-case median and p95, peak RSS of the largest process, the ratio to 1 process, and the per-core figure with an
(explicitly labelled) extrapolation to larger nodes.

**Jobs**:

Set-up: a throw-away PostgreSQL cluster (``tests/server/pg.py``: initdb + pg_ctl on a free 127.0.0.1 port), the tiny
segformer3d trained for one epoch on the tiny test dataset (or the models of ``--models``), and for each replica
count a fresh database and a shared job folder. Replicas are uvicorn servers in threads of this process (each its
own app, :class:`server.jobs.JobManager`, PostgreSQL connection and job *worker process*, where the inference runs),
so the figures are those of the job path: submit, claim, run in the worker, finish.

Measured per replica set-up (1 replica; 2 replicas with torch's default threads in each job worker, i.e. every
core each; 2 replicas with ``worker_threads`` = cores / 2, a fair split of the cores):

* warm-up: one job per replica first, so every replica's worker has started (torch imported, model opened);
* **jobs per minute**: ``--jobs`` small jobs (``--size``³ float32 NIfTI, json output) submitted at once, alternately
  to each replica; wall time from the first submission to the last job ``done``; the job latency (row
  ``finished - created``, submission to done, queueing included) median and p95, and the median run time;
* **claim latency, end to end**: with every replica idle, one job at a time: ``started - created`` of the row (the
  submitting replica's dispatcher is woken at once; another replica would find it at its next idle poll, <= 1 s);
* **claim latency, store**: the time of one ``claim()`` call (one transaction with ``FOR UPDATE SKIP LOCKED``)
  over ``--claims`` rows, PostgreSQL and SQLite, measured in this process.

Prints the CPU model and flags; the machine's load average is recorded before and after each part, since every
process shares the CPU cores with everything else on the machine. Writes the tables to
``benchmarks/results/scale.md`` (the reading of a run is added to that file by hand).

Usage::

    .venv/bin/python benchmarks/scale.py [--part all|batch|jobs] [--run runs/demo] [--cases 20] [--ray-cases 20]
        [--models DIR] [--jobs 20] [--size 48] [--claims 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale_batch import batch_table, demo_cases, p95, run_mode  # noqa: E402
from benchmarks.server import tiny_models, volume_bytes  # noqa: E402  (the same tiny model and payload)

KEY = "bench-key"
SECRET = "benchmark-token-secret-0123456789abcdef"


def submit(client: httpx.Client, url: str, payload: bytes) -> str:
    files = {"file": ("case.nii.gz", payload)}
    r = client.post(f"{url}/v1/jobs", files=files, data={"model": "tiny", "output": "json"})
    r.raise_for_status()
    return str(r.json()["id"])


def wait_done(client: httpx.Client, url: str, ids: list[str], timeout_s: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    pending, done = list(ids), {}
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} jobs not done after {timeout_s} s")
        for job_id in list(pending):
            status = client.get(f"{url}/v1/jobs/{job_id}").json()
            if status["state"] in ("done", "failed", "cancelled"):
                if status["state"] != "done":
                    raise RuntimeError(f"job {job_id} {status['state']}: {status['error']}")
                done[job_id] = status
                pending.remove(job_id)
        time.sleep(0.05)
    return [done[i] for i in ids]


def _latency_s(status: dict) -> float:
    """Submission to done, from the job row's own clock (``finished_at - created_at``)."""
    created, finished = (dt.datetime.fromisoformat(status[k]) for k in ("created_at", "finished_at"))
    return (finished - created).total_seconds()


def run_level(
    replicas: int,
    cluster: object,
    models_dir: Path,
    work: Path,
    payload: bytes,
    jobs: int,
    worker_threads: int | None = None,
) -> dict:
    from server.models import ModelStore
    from server.settings import load_settings
    from tests.server.live import live_server

    name = f"bench{replicas}t{worker_threads or 0}"
    url = cluster.create_database(name)  # type: ignore[attr-defined]
    models = ModelStore.load(models_dir, "cpu")
    with ExitStack() as stack:
        lives = []
        for n in range(replicas):
            settings = load_settings(
                models_dir=models_dir,
                data_dir=work / f"data-{name}-{n}",
                shared_dir=work / f"shared-{name}",
                api_keys=[KEY],
                device="cpu",
                jobs_database_url=url,
                token_secret=SECRET,
                replica_id=f"replica-{n}",
                max_queue=max(64, 2 * jobs),
                worker_threads=worker_threads,
            )
            lives.append(stack.enter_context(live_server(settings, models)))
        client = stack.enter_context(httpx.Client(headers={"X-API-Key": KEY}, timeout=120))
        urls = [live.url for live in lives]

        t0 = time.monotonic()
        warm = [submit(client, urls[0], payload) for _ in range(replicas)]  # the first replica to claim is busy
        wait_done(client, urls[0], warm)
        warm_s = time.monotonic() - t0

        t0 = time.monotonic()
        ids = [submit(client, urls[k % replicas], payload) for k in range(jobs)]
        statuses = wait_done(client, urls[-1], ids)
        wall = time.monotonic() - t0
        owners = _owners(url, ids)

        latencies = []
        for k in range(10):
            (status,) = wait_done(client, urls[k % replicas], [submit(client, urls[k % replicas], payload)])
            latencies.append(status["queued_s"])
    cluster.drop_database(name)  # type: ignore[attr-defined]
    latency = [_latency_s(s) for s in statuses]
    return {
        "replicas": replicas,
        "worker_threads": worker_threads,
        "jobs": jobs,
        "wall_s": wall,
        "jobs_per_min": 60.0 * jobs / wall,
        "run_s_median": statistics.median(s["run_s"] for s in statuses),
        "latency_median_s": statistics.median(latency),
        "latency_p95_s": p95(latency),
        "per_replica": {o: owners.count(o) for o in sorted(set(owners))},
        "warmup_s": warm_s,
        "claim_e2e_ms": [1000 * v for v in latencies],
    }


def _owners(url: str, ids: list[str]) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = dict(conn.execute("SELECT id, lease_owner FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall())
    return [str(rows[i]) for i in ids]


def store_claim_ms(cluster: object, work: Path, claims: int) -> dict[str, float]:
    """Median time of one ``claim()`` call on a table of ``claims`` queued rows, per backend."""
    from server.jobs.pg_store import PgJobStore
    from server.jobs.store import Job, JobStore

    out = {}
    url = cluster.create_database("claims")  # type: ignore[attr-defined]
    for backend, store in (("PostgreSQL", PgJobStore(url)), ("SQLite", JobStore(work / "claims.sqlite3"))):
        for n in range(claims):
            row = Job(f"{n:032x}", "tiny", "tiny", "queued", 0.0, "json", None, "case", time.time() + n * 1e-6,
                      None, None, 0, None, f"{n:032x}/input.nii.gz", None, None)  # fmt: skip
            store.insert_if_room(row, max_active=claims + 1)
        times = []
        for _ in range(claims):
            t0 = time.perf_counter()
            store.claim("bench", 30.0)
            times.append(time.perf_counter() - t0)
        out[backend] = 1000 * statistics.median(times)
        store.close()
    cluster.drop_database("claims")  # type: ignore[attr-defined]
    return out


def machine_lines(meta: dict) -> list[str]:
    """The machine, as the report describes it."""
    return [
        f"Machine: {meta['cpu']}; {meta['cores']} cores usable by this process, {meta['mem_gib']:.0f} GiB RAM, "
        f"torch {meta['torch']} (CPU), Python {meta['python']}. The cores are shared with other work on the machine: "
        "the load average is recorded around each part.",
    ]


def batch_lines(meta: dict, levels: list[dict]) -> list[str]:
    b = meta["batch"]
    ray_note = ""
    if b["ray_cases"] != b["cases"]:
        ray_note = f" Ray ran on the first {b['ray_cases']} of them (to keep the run short)."
    return [
        "## Batch inference: 1 process, 2 shards, Ray with 2 workers",
        "",
        f"Model: {b['model']}. Cases: {b['cases']} demo brain subjects, 197x233x189 at 1 mm (float32 NIfTI, "
        f"`write_demo_dataset(n_heldout={b['cases']})`).{ray_note} Each mode is a fresh "
        "`python -m pipelines.cli predict RUN IN_DIR --out OUT --no-progress` subprocess tree, so the wall time "
        "includes start-up (imports, opening the model; Ray also starts its local instance). Shards: "
        "`--num-parts 2 --part-id 0|1` started together with `OMP_NUM_THREADS` = cores / 2; Ray: "
        "`--ray --ray-workers 2` (local instance, `num_cpus=2`, one torch thread per worker). Per-case time: input "
        "first read to its `_seg.json` written. "
        f"Load average (1 min) before / after: {b['load_before']:.2f} / {b['load_after']:.2f}.",
        "",
        *batch_table(levels, meta["cores"]),
        "",
    ]


def jobs_lines(meta: dict, levels: list[dict], claim_ms: dict[str, float]) -> list[str]:
    j = meta["jobs"]
    one = levels[0]["jobs_per_min"]
    lines = [
        "## Jobs through server replicas on one PostgreSQL job store",
        "",
        f"PostgreSQL {j['pg']} (throw-away cluster, fsync off); replicas as uvicorn servers in threads of one "
        "process, each with its own job worker process. "
        f"Jobs: {levels[0]['jobs']} x {j['size']}^3 float32 NIfTI, json output, tiny segformer3d, submitted at once "
        "alternately to each replica. Latency: the job row's `finished - created` (submission to done, queueing "
        f"included). Load average (1 min) before / after: {j['load_before']:.2f} / {j['load_after']:.2f}.",
        "",
        "| replicas | job worker threads | jobs/min | ratio vs 1 | wall (s) | latency median (s) | latency p95 (s) | "
        "median run per job (s) | jobs per replica | warm-up (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        share = ", ".join(f"{k}: {v}" for k, v in lv["per_replica"].items())
        threads = f"{lv['worker_threads']} (`worker_threads`)" if lv["worker_threads"] else "default (every core)"
        lines.append(
            f"| {lv['replicas']} | {threads} | {lv['jobs_per_min']:.1f} | {lv['jobs_per_min'] / one:.2f} | "
            f"{lv['wall_s']:.1f} | {lv['latency_median_s']:.2f} | {lv['latency_p95_s']:.2f} | "
            f"{lv['run_s_median']:.2f} | {share} | {lv['warmup_s']:.1f} |"
        )
    lines += [
        "",
        "Claim latency, end to end (row `started - created`, idle replicas, 10 jobs one at a time):",
        "",
        "| replicas | job worker threads | median (ms) | max (ms) |",
        "|---|---|---|---|",
    ]
    for lv in levels:
        lat = lv["claim_e2e_ms"]
        threads = str(lv["worker_threads"]) if lv["worker_threads"] else "default"
        lines.append(f"| {lv['replicas']} | {threads} | {statistics.median(lat):.1f} | {max(lat):.1f} |")
    lines += [
        "",
        f"Claim latency, store (one `claim()` transaction, median of {j['claims']} claims from "
        f"{j['claims']} queued rows): " + ", ".join(f"{k} {v:.2f} ms" for k, v in claim_ms.items()) + ".",
        "",
    ]
    return lines


def write_report(path: Path, meta: dict, batch: list[dict] | None, jobs: tuple[list[dict], dict] | None) -> str:
    lines = ["# Scaling on one machine: batch inference and server replicas (CPU)", "", *machine_lines(meta), ""]
    lines.append(f"Command: `{meta['command']}`")
    lines.append("")
    if batch:
        lines += batch_lines(meta, batch)
    if jobs:
        lines += jobs_lines(meta, *jobs)
    text = "\n".join(lines)
    path.write_text(text)
    return text


def batch_part(args: argparse.Namespace, work: Path, meta: dict) -> list[dict]:
    """The three batch modes over ``args.cases`` demo cases (see :mod:`benchmarks.scale_batch`)."""
    run, model = args.run, f"`{args.run}` (the demo run directory: segformer3d, ROI 64^3, 1.5 mm)"
    if not (run / "config.yaml").is_file():
        run = tiny_models(work) / "tiny"
        model = f"{args.run} was missing, so the tiny test model (segformer3d, one epoch on the tiny dataset) was used"
    print("writing demo cases ...", flush=True)
    images = demo_cases(work / "demo", args.cases)
    ray_images = images
    if args.ray_cases < args.cases:
        ray_images = work / "ray-images"
        ray_images.mkdir()
        for path in sorted(images.iterdir())[: args.ray_cases]:
            os.link(path, ray_images / path.name)
    load_before = os.getloadavg()[0]
    levels = []
    for mode in ("1 process", "2 shards", "ray 2 workers"):
        source = ray_images if mode.startswith("ray") else images
        levels.append(run_mode(mode, run, source, work, meta["cores"], ROOT))
        print(levels[-1], flush=True)
    meta["batch"] = {
        "model": model,
        "cases": args.cases,
        "ray_cases": min(args.ray_cases, args.cases),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    return levels


def jobs_part(args: argparse.Namespace, work: Path, meta: dict) -> tuple[list[dict], dict]:
    """Jobs with 1 replica, 2 replicas (default threads) and 2 replicas with ``worker_threads`` = cores / 2."""
    from tests.server.pg import pg_bin_dir, pg_cluster

    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (initdb/pg_ctl): apt-get install postgresql")
    load_before = os.getloadavg()[0]
    with pg_cluster(bin_dir) as cluster:
        models_dir = args.models or tiny_models(work / "jobs")
        payload = volume_bytes(args.size)
        levels = []
        for replicas, threads in ((1, None), (2, None), (2, max(1, meta["cores"] // 2))):
            levels.append(run_level(replicas, cluster, models_dir, work, payload, args.jobs, threads))
            print(levels[-1], flush=True)
        claim_ms = store_claim_ms(cluster, work, args.claims)
        import psycopg

        with psycopg.connect(cluster.url()) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
    meta["jobs"] = {
        "pg": pg,
        "size": args.size,
        "claims": args.claims,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    return levels, claim_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "batch", "jobs"), default="all")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="model of the batch part")
    parser.add_argument("--cases", type=int, default=20, help="demo cases of the batch part")
    parser.add_argument("--ray-cases", type=int, default=20, help="of those, how many the Ray mode predicts")
    parser.add_argument("--models", type=Path, default=None, help="a models folder serving `tiny` (default: train)")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.md")
    args = parser.parse_args()

    import platform

    import torch

    from medseg.core.cpu import cpu_info

    cpu = cpu_info().describe()
    print(f"CPU: {cpu}", flush=True)
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    meta: dict = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "mem_gib": mem_kib / 2**20,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
    }
    batch = jobs = None
    with tempfile.TemporaryDirectory(prefix="medseg-scale-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "batch"):
            batch = batch_part(args, work, meta)
        if args.part in ("all", "jobs"):
            jobs = jobs_part(args, work, meta)
    print(write_report(args.out, meta, batch, jobs))


if __name__ == "__main__":
    main()
