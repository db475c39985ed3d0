"""Server benchmark: ``POST /v1/models/tiny/predict`` latency and throughput on loopback, and the server's peak RSS.

Starts the real server (``python -m pipelines.serve`` = uvicorn, auth off, CPU) on a free 127.0.0.1 port, serving
the tiny segformer3d trained for one epoch on the tiny test dataset (or the models of ``--models``). The input is one
128³ float32 NIfTI (a sphere and a box on noise, rotated anisotropic affine, ~7.5 MB gzipped). Measured:

* latency: ``--latency-requests`` sequential requests after one warm-up (wall time per request at the client:
  upload, decode, inference, NIfTI encode, download); p50/p95 by linear interpolation;
* throughput with 1/4/16 concurrent clients (a thread each, one connection each): the sequential run is the 1-client
  level; with N > 1 clients every client sends ``max(1, --min-requests // N)`` requests; requests/s = requests / wall;
* the server process's peak RSS (``VmHWM`` from ``/proc``) after the run.

Inference on one model is serialised by its lock, so throughput stays near 1/latency and extra clients queue: the
latency at 16 clients shows that queueing. Writes ``benchmarks/results/server-cpu.md``.

Usage::

    .venv/bin/python benchmarks/server.py [--models DIR] [--size 128] [--latency-requests 5] [--clients 1,4,16]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def tiny_models(work: Path) -> Path:
    """Train the tiny test model (one epoch, ~15 s) into ``work/models/tiny``."""
    from pipelines.train import TrainRequest, train
    from tests.helpers import tiny_config, write_msd

    data = write_msd(work / "Task01_Tiny")
    cfg = tiny_config(work / "tiny.yaml", epochs=1)
    train(TrainRequest(data, config=cfg, out=work / "models" / "tiny", show_progress=False))
    return work / "models"


def volume_bytes(size: int) -> bytes:
    from tests.helpers import make_case, tiny_affine

    image, _ = make_case(np.random.default_rng(0), (size, size, size))
    return gzip.compress(nib.Nifti1Image(image, tiny_affine()).to_bytes(), compresslevel=1)


def start_server(models: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = work / "settings.yaml"
    settings.write_text(yaml.safe_dump({"data_dir": str(work / "data"), "device": "cpu", "sync_timeout_s": 3600}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_")}
    cmd = [sys.executable, "-m", "pipelines.serve", "--models", str(models), "--port", str(port), "--no-auth"]
    cmd += ["--settings", str(settings), "--log-level", "warning"]
    with open(work / "server.log", "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start in 180 s")


def predict_once(client: httpx.Client, url: str, payload: bytes, check_size: int | None = None) -> float:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/models/tiny/predict", files={"file": ("bench.nii.gz", payload)})
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"predict answered {r.status_code}: {r.text[:300]}")
    if check_size is not None:  # the answer is a mask on the upload's grid with foreground in it
        mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
        if mask.shape != (check_size,) * 3 or not mask.any():
            raise RuntimeError(f"unexpected mask: shape {mask.shape}, labels {np.unique(mask)}")
    return elapsed


def concurrent_level(url: str, payload: bytes, clients: int, per_client: int) -> dict:
    def one_client(_: int) -> list[float]:
        with httpx.Client(timeout=3600) as client:
            return [predict_once(client, url, payload) for _ in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(one_client, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "wall": wall, "latencies": latencies}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_gib(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Vm")
    )
    return float(fields["VmHWM"].split()[0]) / 2**20, float(fields["VmRSS"].split()[0]) / 2**20


def write_report(path: Path, meta: dict, levels: list[dict], latency: list[float], rss: tuple[float, float]) -> str:
    lines = [
        f"# Server on CPU ({meta['machine']}, {meta['cores']} cores; loopback; tiny segformer3d)",
        "",
        f"`POST /v1/models/tiny/predict` with a {meta['size']}³ float32 NIfTI ({meta['upload_mb']:.1f} MB gzipped), "
        "output NIfTI; uvicorn (`python -m pipelines.serve`), auth off, one model lock. Client wall time per request "
        "(upload + decode + sliding-window inference + encode + download). "
        f"Shared machine (other jobs running): load average {meta['load']} at the start, {meta['load_end']} at the "
        "end, so wall times vary by up to 3x between runs; the server's CPU seconds per request are the steadier "
        "figure.",
        "",
        f"Latency over {len(latency)} sequential requests (after 1 warm-up): "
        f"**p50 {percentile(latency, 50):.2f} s, p95 {percentile(latency, 95):.2f} s** "
        f"(min {min(latency):.2f}, max {max(latency):.2f}).",
        "",
        "| clients | requests | wall (s) | throughput (req/s) | latency p50 (s) | latency p95 (s) "
        "| server CPU s / request |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        lat = lv["latencies"]
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['wall']:.1f} | {lv['requests'] / lv['wall']:.3f} | "
            f"{percentile(lat, 50):.2f} | {percentile(lat, 95):.2f} | {lv['cpu'] / lv['requests']:.2f} |"
        )
    lines += [
        "",
        f"Server peak RSS (VmHWM): **{rss[0]:.2f} GiB** (RSS at the end {rss[1]:.2f} GiB).",
        "",
        "Inference on one model is serialised by its lock (sliding window, resampling to the input grid), so more "
        "clients wait in line: latency grows with the number of clients, and throughput gains come only from "
        "overlapping one request's upload/decode/encode with another's inference. Scale out with more server "
        "processes or a GPU, or send large inputs to `/v1/jobs`.",
        "",
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s in total).",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None, help="models folder serving `tiny` (default: train one)")
    parser.add_argument("--size", type=int, default=128, help="edge of the cubic input volume")
    parser.add_argument("--latency-requests", type=int, default=5)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--min-requests", type=int, default=4, help="requests per level with more than one client")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server-cpu.md")
    args = parser.parse_args()
    started = time.perf_counter()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="medseg-bench-server-") as tmp:
        work = Path(tmp)
        models = args.models or tiny_models(work)
        payload = volume_bytes(args.size)
        process, url = start_server(models, work)
        try:
            with httpx.Client(timeout=3600) as client:
                predict_once(client, url, payload, check_size=args.size)  # warm-up
                cpu0 = cpu_seconds(process.pid)
                latency = [predict_once(client, url, payload) for _ in range(args.latency_requests)]
                sequential_cpu = cpu_seconds(process.pid) - cpu0
            levels = []
            for clients in (int(c) for c in args.clients.split(",")):
                if clients == 1:
                    levels.append(
                        {
                            "clients": 1,
                            "requests": len(latency),
                            "wall": sum(latency),
                            "latencies": latency,
                            "cpu": sequential_cpu,
                        }  # fmt: skip
                    )
                    continue
                per_client = max(1, args.min_requests // clients)
                cpu0 = cpu_seconds(process.pid)
                levels.append(concurrent_level(url, payload, clients, per_client))
                levels[-1]["cpu"] = cpu_seconds(process.pid) - cpu0
                print(f"{clients} clients: {levels[-1]['requests']} requests in {levels[-1]['wall']:.1f} s")  # noqa: T201
            rss = peak_rss_gib(process.pid)
        finally:
            process.terminate()
            process.wait(60)
    meta = {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "size": args.size,
        "upload_mb": len(payload) / 1e6,
        "load": load,
        "load_end": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": "python benchmarks/server.py " + " ".join(sys.argv[1:]),
        "seconds": time.perf_counter() - started,
    }
    print(write_report(args.out, meta, levels, latency, rss))  # noqa: T201


if __name__ == "__main__":
    main()
