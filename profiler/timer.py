"""Timing of short device operations: warm-up, then the median of several repetitions.

On CUDA a repetition is bracketed by CUDA events (device time, no host jitter); on CPU by
`time.perf_counter`. A repetition runs the operation `iters` times back to back and reports the mean, so
operations far shorter than the clock's resolution or the scheduler's time slice are still timed well;
`iters` is chosen so one repetition lasts at least `min_rep_s` seconds.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def synchronize(device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if getattr(device, "type", device) == "cuda":
        import torch
        torch.cuda.synchronize()


def time_op(fn: Callable[[], object], device, warmup: int = 2, reps: int = 5, min_rep_s: float = 0.005,
            max_iters: int = 1000, iters: int | None = None) -> float:
    """Median seconds per call of `fn` on `device` ('cpu' or 'cuda').

    `warmup` untimed calls first (allocator, caches, lazy initialisation); then `reps` timed
    repetitions of `iters` calls each (chosen from one probe call when not given).
    """
    is_cuda = getattr(device, "type", device) == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    if iters is None:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        probe = time.perf_counter() - t0
        iters = max(1, min(max_iters, math.ceil(min_rep_s / max(probe, 1e-9))))
    samples = []
    if is_cuda:
        import torch
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / iters)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def time_host(fn: Callable[[], object], device, warmup: int = 1, reps: int = 5, iters: int = 1) -> float:
    """Median wall seconds per call of `fn`, synchronising the device after each repetition.

    For operations that block on other processes (point-to-point transfers, collectives), where device
    events on one rank would miss the time spent waiting for the peer.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)
