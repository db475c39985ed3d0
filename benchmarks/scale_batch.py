"""Batch-inference part of ``benchmarks/scale.py``: ``medseg predict`` over demo-sized cases as 1 process, as 2 shards
started together (``--num-parts 2 --part-id 0|1``, each with ``OMP_NUM_THREADS`` = cores / 2, which
:func:`medseg.core.cpu.configure_threads` keeps) and on a local Ray instance (``--ray --ray-workers 2``; Ray gets
``num_cpus`` = workers and each worker one torch thread).

Every mode is a fresh subprocess tree of ``python -m pipelines.cli predict RUN IN_DIR --out OUT --no-progress``, so
the wall time includes interpreter start-up, imports and opening the model, as a batch job would pay them.

Per-case time is ``mtime(<case>_seg.json) - atime(input)``: the statistics file is written last for each case, and
the input's access time is set before the first read of the mode (it is reset to before its modification time ahead of
every mode, and a ``relatime`` mount then records the first read). Where the file system does not record reads
(``noatime``) the per-case figures are left out. Peak RSS is the largest ``VmHWM`` seen in ``/proc`` over every
process of the mode's tree (sampled every 0.2 s; Ray's workers are children of its raylet, itself a child of the
driver).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SAMPLE_S = 0.2


def demo_cases(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` demo brain subjects (197x233x189 at 1 mm) in ``root/brain_heldout/images``."""
    from medseg.data.demo_brain import write_demo_dataset

    _, heldout = write_demo_dataset(root, n_train=0, n_heldout=n, seed=seed)
    return heldout / "images"


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from ``/proc/*/stat`` parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _hwm_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_tree(commands: list[tuple[list[str], dict[str, str]]], log_dir: Path) -> dict[str, Any]:
    """Start every command at once and wait for all; wall time and the peak RSS of the largest process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs = []
    for k, (cmd, env) in enumerate(commands):
        log = open(log_dir / f"proc{k}.log", "w")  # noqa: SIM115 - closed below, after the process
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))  # noqa: S603
    peak = 0.0
    while any(p.poll() is None for p, _ in procs):
        for p, _ in procs:
            if p.poll() is None:
                peak = max([peak, _hwm_mib(p.pid)] + [_hwm_mib(c) for c in _children(p.pid)])
        time.sleep(SAMPLE_S)
    wall = time.monotonic() - t0
    for p, log in procs:
        log.close()
        if p.returncode != 0:
            tail = (log_dir / f"proc{procs.index((p, log))}.log").read_text()[-3000:]
            raise RuntimeError(f"{p.args} exited {p.returncode}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": peak, "t0_wall": time.time() - wall}


def _reset_atimes(cases: list[Path]) -> None:
    for path in cases:
        st = path.stat()
        os.utime(path, (st.st_mtime - 3600, st.st_mtime))


def _case_seconds(cases: list[Path], out: Path) -> list[float] | None:
    """Per-case seconds from the input's first read to its statistics file; ``None`` if reads were not recorded."""
    times = []
    for path in cases:
        name = path.name.split(".")[0]
        stats = out / f"{name}_seg.json"
        if not stats.is_file():
            raise RuntimeError(f"{stats} was not written")
        st = path.stat()
        if st.st_atime < st.st_mtime:  # the reset value: this file system did not record the read
            return None
        times.append(stats.stat().st_mtime - st.st_atime)
    return times


def p95(values: list[float]) -> float:
    """The 95th percentile (linear interpolation between order statistics)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = 0.95 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_mode(mode: str, run: Path, images: Path, work: Path, cores: int, root: Path) -> dict[str, Any]:
    """One mode (``1 process``, ``2 shards``, ``ray 2 workers``) over every case in ``images``."""
    cases = sorted(p for p in images.iterdir() if p.name.endswith(".nii.gz"))
    out = work / f"out-{mode.replace(' ', '-')}"
    base = [sys.executable, "-m", "pipelines.cli", "predict", str(run), str(images), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("OMP_NUM_THREADS", None)
    if mode == "1 process":
        commands, threads = [(base, env)], cores
    elif mode == "2 shards":
        threads = max(1, cores // 2)
        shard_env = {**env, "OMP_NUM_THREADS": str(threads)}
        commands = [([*base, "--num-parts", "2", "--part-id", str(k)], shard_env) for k in range(2)]
    elif mode == "ray 2 workers":
        commands, threads = [([*base, "--ray", "--ray-workers", "2"], env)], 1
    else:
        raise ValueError(f"unknown mode {mode!r}")
    _reset_atimes(cases)
    result = run_tree(commands, work / "logs" / out.name)
    seconds = _case_seconds(cases, out)
    n = len(cases)
    return {
        "mode": mode,
        "processes": len(commands),
        "threads": threads,
        "cases": n,
        "wall_s": result["wall_s"],
        "cases_per_min": 60.0 * n / result["wall_s"],
        "case_median_s": statistics.median(seconds) if seconds else None,
        "case_p95_s": p95(seconds) if seconds else None,
        "first_start_s": (min(p.stat().st_atime for p in cases) - result["t0_wall"]) if seconds else None,
        "peak_rss_mib": result["peak_rss_mib"],
    }


def batch_table(levels: list[dict[str, Any]], cores: int) -> list[str]:
    """Markdown lines: the batch table and the per-core extrapolation."""
    base = levels[0]["cases_per_min"]

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| mode | processes x torch threads | cases | cases/min | ratio vs 1 process | wall (s) | per-case median (s) "
        "| per-case p95 (s) | start-up to first read (s) | peak RSS, largest process (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        procs = f"{lv['processes']} x {lv['threads']}" if lv["mode"] != "ray 2 workers" else "2 Ray workers x 1"
        lines.append(
            f"| {lv['mode']} | {procs} | {lv['cases']} | {lv['cases_per_min']:.2f} | {lv['cases_per_min'] / base:.2f} "
            f"| {lv['wall_s']:.1f} | {fmt(lv['case_median_s'])} | {fmt(lv['case_p95_s'])} | "
            f"{fmt(lv['first_start_s'])} | {lv['peak_rss_mib'] / 1024:.2f} |"
        )
    best = max(levels, key=lambda lv: lv["cases_per_min"])
    per_core = best["cases_per_min"] / cores
    lines += [
        "",
        f"Per core: the best mode here ({best['mode']}) gives {best['cases_per_min']:.2f} cases/min on {cores} cores, "
        f"{per_core:.2f} cases/min per core ({60 / per_core:.0f} core-seconds per case, start-up included).",
        "",
        "Extrapolation, not measured: if the per-core figure held on a larger node (cases sharded one process per "
        "1-2 cores, enough memory for one process each at the peak RSS above, no shared-storage bottleneck):",
        "",
        "| cores | cases/min (extrapolated) | cases/hour (extrapolated) |",
        "|---|---|---|",
    ]
    for n in (8, 16, 32, 64):
        lines.append(f"| {n} | {n * per_core:.1f} | {60 * n * per_core:.0f} |")
    return lines
