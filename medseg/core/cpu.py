"""What the CPU can do, detected at run time: model, cores, SIMD flags, native bf16, a peak FLOP/s estimate.

Machines differ (AVX2 only, AVX-512, AVX512-BF16, AMX), so inference settings that depend on the CPU (bf16 autocast,
thread counts) are chosen from :func:`cpu_info` rather than assumed. Linux ``/proc/cpuinfo`` is read when present;
elsewhere the fields fall back to what ``os`` and ``platform`` say.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CpuInfo", "configure_threads", "cpu_info"]

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU this process runs on.

    Attributes:
        model: model name (``/proc/cpuinfo``'s ``model name``).
        logical: logical CPUs this process may run on (its affinity mask).
        physical: physical cores among them (hyper-threads counted once).
        mhz: nominal clock in MHz (0 when unknown).
        flags: the CPU's feature flags.
    """

    model: str
    logical: int
    physical: int
    mhz: float
    flags: frozenset[str]

    @property
    def simd(self) -> str:
        """Widest vector extension: ``avx512``, ``avx2``, ``sse`` or ``other``."""
        if "avx512f" in self.flags:
            return "avx512"
        if "avx2" in self.flags:
            return "avx2"
        return "sse" if "sse4_2" in self.flags else "other"

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix arithmetic runs in hardware (AVX512-BF16 or AMX-BF16)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        """Whether AMX tiles (``amx_tile``) are present."""
        return "amx_tile" in self.flags

    def peak_gflops(self, dtype: str = "float32") -> float:
        """Estimated peak GFLOP/s of the physical cores: cores x clock x lanes x 2 (FMA) x 2 FMA units.

        ``bfloat16`` doubles the lanes where the CPU has native bf16 dot products. 0 when the clock is unknown.
        """
        lanes = {"avx512": 16, "avx2": 8, "sse": 4}.get(self.simd, 1)
        if dtype == "bfloat16" and self.native_bf16:
            lanes *= 2
        return self.physical * self.mhz / 1000.0 * lanes * 2 * 2

    def describe(self) -> str:
        """One line for logs and benchmark headers."""
        interesting = sorted(f for f in self.flags if f.startswith(("avx", "amx", "fma")))
        return (
            f"{self.model}; {self.physical} physical / {self.logical} logical cores at {self.mhz:.0f} MHz; "
            f"SIMD {self.simd}, native bf16 {'yes' if self.native_bf16 else 'no'}; flags {' '.join(interesting)}"
        )


@functools.cache
def cpu_info() -> CpuInfo:
    """Detect the CPU once per process."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    model, mhz, flags, cores = platform.processor() or platform.machine(), 0.0, frozenset[str](), set()
    try:
        text = _CPUINFO.read_text()
    except OSError:
        text = ""
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key == "cpu MHz" and not mhz:
            mhz = float(value or 0)
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    physical = min(len(cores), logical) if cores else logical
    return CpuInfo(model=model, logical=logical, physical=max(1, physical), mhz=mhz, flags=flags)


@functools.cache
def configure_threads() -> int:
    """Set torch's intra-op threads to the physical cores once (no oversubscription); returns the count.

    A user who set ``OMP_NUM_THREADS`` keeps it.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = cpu_info().physical
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
