"""Split the blocks of a model into contiguous pipeline stages.

All blocks of a model are identical, so a stage's time and memory are linear in its block count:
time_j = n_j * block_time_j + extra_time_j (embedding on the first stage, LM head and loss on the last; a
block's time is per stage because stages of a heterogeneous cluster run on different GPU types) and
memory_j = n_j * block_bytes_j + base_bytes_j (block_bytes_j grows with the micro-batches stage j holds).
Minimising the slowest stage under every stage's memory cap is then a min-max allocation of separable
increasing costs, which the greedy below solves exactly (each block goes to the stage it slows least;
Ibaraki & Katoh, Resource Allocation Problems, 1988, Ch. 4). Over contiguous ranges this is the same
optimum as the dynamic program of Galvatron / AMP; tests check it against brute-force enumeration.
"""

from __future__ import annotations

import heapq
import math


def partition_layers(num_layers: int, block_time: float | list[float], extra_time: list[float],
                     block_bytes: list[float] | None = None, base_bytes: list[float] | None = None,
                     capacity: float = math.inf, caps: list[int] | None = None, least: int = 1) -> list[int] | None:
    """Blocks per stage (each >= `least`) minimising the slowest stage subject to memory; None if no split fits.

    Memory is either affine per stage (`block_bytes`, `base_bytes` against `capacity`) or given directly as the
    most blocks each stage can hold (`caps`, from the cost model's memory timeline, monotone in the block
    count). `block_time` is one block's seconds on every stage, or on each stage. Ties go to later stages, which
    under 1F1B hold fewer micro-batches in flight. `least`: an interleaved device holds at least one block per
    chunk.
    """
    stages = len(extra_time)
    block_s = [block_time] * stages if isinstance(block_time, (int, float)) else list(block_time)
    if len(block_s) != stages:
        raise ValueError(f"{len(block_s)} block times for {stages} stages")
    if stages * least > num_layers:
        return None
    if caps is None:
        caps = []
        for j in range(stages):
            per_block = block_bytes[j] if block_bytes else 0.0
            room = capacity - (base_bytes[j] if base_bytes else 0.0)
            fits = num_layers if per_block <= 0 or math.isinf(room) else math.floor(room / per_block)
            caps.append(min(num_layers, fits))
    caps = [min(num_layers, c) for c in caps]
    if min(caps) < least or sum(caps) < num_layers:
        return None
    counts = [least] * stages
    heap = [(((least + 1) * block_s[j] + extra_time[j]), -j) for j in range(stages) if caps[j] > least]
    heapq.heapify(heap)
    for _ in range(num_layers - stages * least):
        _, neg_j = heapq.heappop(heap)
        j = -neg_j
        counts[j] += 1
        if counts[j] < caps[j]:
            heapq.heappush(heap, ((counts[j] + 1) * block_s[j] + extra_time[j], -j))
    return counts


def spread_over_chunks(blocks: int, chunks: int) -> list[int]:
    """`blocks` spread near-equally over a device's `chunks` model chunks (interleaved pipelines), the remainder
    on its later chunks: under interleaved 1F1B a device holds fewer in-flight micro-batches of those."""
    base, rest = divmod(blocks, chunks)
    return [base + (1 if k >= chunks - rest else 0) for k in range(chunks)]


def balanced_layers(num_layers: int, chunks: int) -> list[int]:
    """Near-equal blocks per chunk, the remainder on the first chunks (what an engine's uniform split does:
    DeepSpeed's ds_utils.partition_uniform)."""
    base, rest = divmod(num_layers, chunks)
    return [base + (1 if j < rest else 0) for j in range(chunks)]
