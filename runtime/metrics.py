"""What each rank measures: step times and peak memory.

GPU: `torch.cuda.max_memory_allocated` / `max_memory_reserved` (bytes held by tensors / by the caching
allocator), comparable with the plan's `peak_memory_bytes` / `peak_reserved_bytes`.
CPU: there is no allocator counter, so the process's peak resident set size (`getrusage` ru_maxrss, bytes)
and its increase over a baseline read after importing torch and joining the process group; the increase
is the figure comparable with the plan's tensor bytes (it also holds allocator slack and the autograd
graph, and misses memory freed before the peak).
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch


def current_rss_bytes() -> int:
    """Resident set size of this process now, bytes (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    """Peak memory of this rank. Call `baseline()` before building the model, `read()` at the end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def baseline(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = current_rss_bytes()

    def read(self) -> dict:
        """{'memory_kind', 'peak_memory_bytes', 'peak_reserved_bytes', 'baseline_bytes',
        'peak_memory_increase_bytes'}, all bytes."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"memory_kind": "cuda_max_allocated", "peak_memory_bytes": peak,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "baseline_bytes": self.base, "peak_memory_increase_bytes": peak - self.base}
        peak = peak_rss_bytes()
        return {"memory_kind": "cpu_peak_rss", "peak_memory_bytes": peak, "peak_reserved_bytes": None,
                "baseline_bytes": self.base, "peak_memory_increase_bytes": max(0, peak - self.base)}


class StepTimer:
    """Wall-clock seconds of each step on this rank (device work included: CUDA is synchronised)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt
