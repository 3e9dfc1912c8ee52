"""How much compute slows down when communication runs under it (Galvatron's overlap coefficient).

Every rank times a block of GEMMs alone, an all-reduce over all ranks alone, and both started together
(the all-reduce asynchronous, the GEMMs meanwhile). The number of GEMMs is chosen so the compute lasts
about as long as the all-reduce, where overlap matters most. `profiler.fit.overlap_slowdown` turns the
three times into the cost model's `overlap_slowdown`.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.distributed as dist

from profiler.devices import DTYPES
from profiler.timer import synchronize, time_host


def measure_overlap(device: torch.device, dtype: str, gemm_n: int, message_bytes: int, reps: int = 5) -> dict:
    """Seconds of compute alone, communication alone and both, on this rank (every rank calls it)."""
    a = torch.randn(gemm_n, gemm_n, device=device).to(DTYPES[dtype])
    b = torch.randn(gemm_n, gemm_n, device=device).to(DTYPES[dtype])
    c = torch.empty_like(a)
    buf = torch.ones(message_bytes // 4, device=device)

    comm = time_host(lambda: dist.all_reduce(buf), device, warmup=1, reps=reps)
    one = time_host(lambda: torch.matmul(a, b, out=c), device, warmup=1, reps=3, iters=2)
    # every rank must run the same number of GEMMs, or the faster ones wait in the next all-reduce
    count = torch.tensor([max(1, math.ceil(comm / max(one, 1e-9)))], dtype=torch.float64)
    if device.type == "cuda":
        count = count.to(device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    gemms = int(min(count.item(), 10_000))

    def compute():
        for _ in range(gemms):
            torch.matmul(a, b, out=c)

    compute_s = time_host(compute, device, warmup=0, reps=reps)
    both = []
    for _ in range(reps + 1):
        dist.barrier()
        synchronize(device)
        t0 = time.perf_counter()
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()
        synchronize(device)
        both.append(time.perf_counter() - t0)
    return {"compute_s": compute_s, "comm_s": comm, "both_s": statistics.median(both[1:]), "gemms": gemms,
            "gemm_n": gemm_n, "dtype": dtype, "message_bytes": 4 * (message_bytes // 4)}
