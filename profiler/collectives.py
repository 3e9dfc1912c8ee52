"""All-reduce, all-gather and reduce-scatter time by group size, for contiguous and strided groups.

A "partition" splits all N ranks into N/g groups of g ranks: contiguous ({0..g-1}, {g..2g-1}, ...: a TP
group inside a node) or strided ({0, N/g, 2N/g, ...}, ...: a DP group across nodes). All groups of a
partition run at once, as in training, and the partition's time is its slowest group's. Message sizes
are the full, unsharded buffer M (the all-gather's output, the reduce-scatter's input), the convention of
`planner.cost.comm` and nccl-tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from profiler.timer import time_host

OPS = ("all_reduce", "all_gather", "reduce_scatter")
# the single-tensor forms (named *_single since torch 2.10, *_into_tensor / *_tensor before)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_sizes(world: int) -> list[int]:
    """Every divisor g >= 2 of the world size."""
    return [g for g in range(2, world + 1) if world % g == 0]


def partition(world: int, g: int, contiguous: bool) -> list[list[int]]:
    """The N/g groups of g ranks: consecutive ranks, or ranks N/g apart."""
    count = world // g
    if contiguous:
        return [list(range(i * g, (i + 1) * g)) for i in range(count)]
    return [list(range(i, world, count)) for i in range(count)]


def partitions(world: int) -> list[tuple[int, bool]]:
    """(group size, contiguous) of every partition worth measuring: strided groups are skipped where they
    equal the contiguous ones (g = N, or g = 1)."""
    out = []
    for g in group_sizes(world):
        out.append((g, True))
        if g < world and world // g > 1:
            out.append((g, False))
    return out


def padded_bytes(nbytes: int, g: int) -> int:
    """The message size rounded up to whole fp32 elements per rank."""
    unit = 4 * g
    return -(-nbytes // unit) * unit


def _op_fn(op: str, nbytes: int, g: int, group, device: torch.device):
    n = nbytes // 4
    if op == "all_reduce":
        buf = torch.ones(n, device=device)
        return lambda: dist.all_reduce(buf, group=group)
    if op == "all_gather":
        out, inp = torch.empty(n, device=device), torch.ones(n // g, device=device)
        return lambda: _ALL_GATHER(out, inp, group=group)
    out, inp = torch.empty(n // g, device=device), torch.ones(n, device=device)
    return lambda: _REDUCE_SCATTER(out, inp, group=group)


def measure_partition(group, g: int, sizes: list[int], device: torch.device, reps: int = 5) -> list[dict]:
    """Median seconds of each op at each message size on this rank's group of the partition."""
    out = []
    for op in OPS:
        for nbytes in sizes:
            m = padded_bytes(nbytes, g)
            fn = _op_fn(op, m, g, group, device)
            iters = 4 if m <= (1 << 18) else 1
            t = time_host(fn, device, warmup=1, reps=reps, iters=iters)
            out.append({"op": op, "message_bytes": m, "time_s": t})
    return out
