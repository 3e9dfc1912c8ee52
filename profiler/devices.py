"""What one device can do: GEMM throughput by shape and dtype, memory copy and elementwise bandwidth,
the per-kernel overhead, fused attention throughput, memory capacity, and its host's cost of issuing eager
PyTorch's kernels (profiler/host.py).

Every process of a run measures its own device at the same time as the others, so on a CPU shared by
several processes each one sees its share, as it would in training. Results are plain dicts (JSON-ready);
`profiler.summarize` fits them into a `GPUSpec`.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Callable

import torch

from profiler.timer import time_op
from runtime.metrics import current_rss_bytes

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (dtype, M, N, K): cubes for the size curve and skinny shapes to separate the tile factor per dimension.
CUDA_GEMMS = ([("bf16", n, n, n) for n in (256, 512, 1024, 2048, 4096, 8192)]
              + [("bf16", 8192, 8192, 256), ("bf16", 16384, 1024, 4096), ("bf16", 1024, 16384, 4096),
                 ("bf16", 4096, 4096, 128)]
              + [("fp16", 4096, 4096, 4096), ("tf32", 4096, 4096, 4096), ("fp32", 4096, 4096, 4096)])
CPU_GEMMS = ([("fp32", n, n, n) for n in (32, 64, 128, 192, 256)]
             + [("fp32", 1024, 64, 256), ("fp32", 64, 1024, 256), ("fp32", 512, 512, 32),
                ("fp32", 2048, 128, 128)]
             + [("bf16", 128, 128, 128)])


def current_device() -> torch.device:
    """The device this process measures: its CUDA device (LOCAL_RANK) if CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def main_dtype(device: torch.device) -> str:
    """The dtype training runs its GEMMs in on this device (bf16 on CUDA; fp32 on CPU, where bf16 is slow)."""
    return "bf16" if device.type == "cuda" else "fp32"


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe(device: torch.device, local_world_size: int) -> dict:
    """Name, memory capacity (bytes) and bytes used outside the allocator of this process's device.

    A CPU run with several processes on one machine splits its RAM and cores evenly between them: the
    name says which share one "device" is.
    """
    info = {"host": socket.gethostname(), "type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=torch.cuda.get_device_name(device), memory_bytes=int(total),
                    runtime_reserved_bytes=int(max(0, total - free - torch.cuda.memory_reserved(device))),
                    multiprocessors=props.multi_processor_count)
    else:
        cores = os.cpu_count() or 1
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = f" (1/{local_world_size} of {cores} cores)" if local_world_size > 1 else f" ({cores} cores)"
        info.update(name=cpu_model_name() + share, memory_bytes=int(ram // max(1, local_world_size)),
                    runtime_reserved_bytes=current_rss_bytes())
    return info


def measure_gemms(device: torch.device, shapes: list[tuple[str, int, int, int]], reps: int = 5,
                  min_rep_s: float = 0.005, sync: Callable[[], None] | None = None) -> list[dict]:
    """Median seconds of C = A @ B for each (dtype, M, N, K); `sync()` (a barrier) before each shape keeps
    processes that share a CPU measuring the same thing at the same time."""
    out = []
    for dtype, m, n, k in shapes:
        if sync is not None:
            sync()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        a = torch.randn(m, k, device=device).to(DTYPES[dtype])
        b = torch.randn(k, n, device=device).to(DTYPES[dtype])
        c = torch.empty(m, n, device=device, dtype=DTYPES[dtype])
        t = time_op(lambda: torch.matmul(a, b, out=c), device, reps=reps, min_rep_s=min_rep_s)
        out.append({"dtype": dtype, "shape": [m, n, k], "time_s": t})
        del a, b, c
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return out


def measure_memory(device: torch.device, nbytes: int, reps: int = 5, min_rep_s: float = 0.02) -> dict:
    """Copy bandwidth (bytes read + written per second, the STREAM 'copy' convention), elementwise
    bandwidth of an out-of-place add (two reads, one write) and the per-kernel overhead (seconds per
    call of an add on one-element tensors)."""
    n = nbytes // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    z = torch.empty_like(x)
    copy = time_op(lambda: y.copy_(x), device, reps=reps, min_rep_s=min_rep_s)
    add = time_op(lambda: torch.add(x, y, out=z), device, reps=reps, min_rep_s=min_rep_s)
    del x, y, z
    one_a, one_b = torch.ones(1, device=device), torch.ones(1, device=device)
    one_c = torch.empty(1, device=device)
    tiny = time_op(lambda: torch.add(one_a, one_b, out=one_c), device, reps=reps, min_rep_s=min_rep_s)
    return {"buffer_bytes": 4 * n, "copy_bandwidth": 2 * 4 * n / copy,
            "elementwise_bandwidth": 3 * 4 * n / add, "kernel_overhead_s": tiny}


def measure_attention(device: torch.device, dtype: str, batch: int, heads: int, seq: int, head_dim: int,
                      reps: int = 3, min_rep_s: float = 0.02) -> dict:
    """Seconds of a causal fused attention (scaled_dot_product_attention) forward plus backward, and the
    FLOPs the cost model charges for it: 0.5 * 4 * b * s^2 * heads * d forward, 2.5x that backward."""
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dt, requires_grad=True)
               for _ in range(3))

    def step():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()

    t = time_op(step, device, warmup=1, reps=reps, min_rep_s=min_rep_s)
    flops = 0.5 * 4 * batch * seq * seq * heads * head_dim * 3.5
    return {"dtype": dtype, "shape": [batch, heads, seq, head_dim], "time_s": t, "flops": flops}


def measure_device(device: torch.device, local_world_size: int, sync: Callable[[], None] | None = None) -> dict:
    """All single-device measurements of this process (run on every rank at once).

    When more threads than cores share a CPU, a timed repetition lasts at least 50 ms, several scheduler
    time slices, so that it sees this process's share of the cores rather than a whole core for the
    length of one slice, and `sync()` (a barrier over the processes) runs before each measurement, so that
    none of them measures while the others have finished and left it the whole CPU.
    """
    torch.manual_seed(0)
    info = describe(device, local_world_size)
    cuda = device.type == "cuda"
    shared = not cuda and local_world_size * torch.get_num_threads() > (os.cpu_count() or 1)
    rep_s, reps = (0.05, 3) if shared else (0.005, 5)
    sync = sync if shared else None
    info["gemm"] = measure_gemms(device, CUDA_GEMMS if cuda else CPU_GEMMS, reps=reps, min_rep_s=rep_s, sync=sync)
    if sync is not None:
        sync()
    info["memory"] = measure_memory(device, (1 << 30) if cuda else (16 << 20), reps=reps,
                                    min_rep_s=max(rep_s, 0.02))
    if sync is not None:
        sync()
    # attention at two head dimensions of the same thread blocks: the rate's dependence on d (summarize.py)
    for key, d in (("attention", 128 if cuda else 64), ("attention_narrow", 64 if cuda else 16)):
        if sync is not None:
            sync()
        info[key] = (measure_attention(device, "bf16", 4, 32, 4096, d) if cuda
                     else measure_attention(device, "fp32", 1, 4, 256, d, min_rep_s=max(rep_s, 0.02)))
    if sync is not None:
        sync()
    from profiler.host import measure_host   # here: profiler.host imports this module
    info["host_issue"] = measure_host(device, info["memory"]["kernel_overhead_s"])
    info["main_dtype"] = main_dtype(device)
    info["shared_cpu"] = shared
    if cuda:
        torch.cuda.empty_cache()
    return info
