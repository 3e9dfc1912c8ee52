"""Data-parallel communication of one pipeline stage, as the engine issues it, and what of it stays exposed.

Which collectives run when (planner/engine.py Overlap and MemoryRecipe):
  * ZeRO 0: one all-reduce of the gradients per step;
  * sharded gradients: a reduce-scatter per step (gradients accumulated first), or after every micro-batch's
    backward (ZeRO-2/3 unless the pipeline defers the sync to the last micro-batch);
  * parameters sharded at rest (FSDP, DeepSpeed ZeRO-3): an all-gather before each micro-batch's forward
    (once per step when the pipeline keeps them gathered after backward) and, resharded after forward
    (ZeRO-3), another before each backward;
  * 16-bit weights kept whole (Megatron's distributed optimizer, DeepSpeed ZeRO-1/2): one all-gather of the
    updated parameters per step, prefetched under the next forward or run after the step.
A reduction the engine issues after the backward (DeepSpeed without overlap_comm) that must still run every
micro-batch (ZeRO-2/3 without a pipeline) runs synchronously in the backward's hooks: it blocks the stream
(`bwd_blocking`).
Every collective runs block by block (one call per block plus one for the embedding, head and norms), so the
piece that has nothing to overlap with (the first block's gather before any compute, the embedding's
gradients produced last in the backward) is exposed whatever the schedule. Collectives that share the
data-parallel links in one window share that window (a ZeRO-3 re-gather and the gradient reduce-scatter of a
backward are summed before they are set against it). What fits under compute still slows it by the
cluster's overlap slow-down (NCCL kernels take SMs and memory bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Collective = Callable[[str, float], float]   # (op, bytes of one call) -> seconds


@dataclass(frozen=True)
class DPComm:
    """Seconds of one stage's data-parallel communication, by where it runs."""

    fwd_each: float = 0.0        # in every micro-batch's forward
    bwd_each: float = 0.0        # in every micro-batch's backward
    first_fwd: float = 0.0       # in the step's first forward only
    last_bwd: float = 0.0        # in the step's last backward only
    after: float = 0.0           # after the last backward, not overlapped
    fwd_piece: float = 0.0       # the piece of a forward gather that cannot overlap
    bwd_piece: float = 0.0       # the piece of a backward reduction that cannot overlap
    fwd_blocking: float = 0.0    # in every micro-batch's forward, blocking the stream (never overlapped)
    bwd_blocking: float = 0.0    # in every micro-batch's backward, blocking the stream

    @property
    def volume_seconds(self) -> float:
        return (self.fwd_each + self.bwd_each + self.first_fwd + self.last_bwd + self.after + self.fwd_blocking
                + self.bwd_blocking)


def exposed(comm: float, window: float, slowdown: float, piece: float = 0.0) -> float:
    """Seconds of `comm` left on the critical path under `window` seconds of compute: the piece with nothing to
    overlap, what does not fit, and the slow-down the overlapped part inflicts (Galvatron's overlap
    coefficient)."""
    if comm <= 0:
        return 0.0
    piece = min(piece, comm)
    rest = comm - piece
    return piece + max(0.0, rest - window) + slowdown * min(rest, window)


def stage_dp_comm(engine, recipe, zero: int, dp: int, pp: int, params: float, blocks: int,
                  collective: Collective, calls_per_block: int = 1) -> DPComm:
    """The data-parallel collectives of a stage holding `params` local parameters in `blocks` blocks, issued
    in `calls_per_block` calls per block (plus one for the embedding, head and norms). `collective(op, nbytes)`
    costs one call on the stage's data-parallel group."""
    if dp == 1:
        return DPComm()
    ov = engine.overlap
    pieces = blocks * calls_per_block + 1

    def blockwise(op: str, nbytes: float) -> tuple[float, float]:
        one = collective(op, nbytes / pieces)
        return pieces * one, one

    grads = params * recipe.reduce_bytes
    weights = params * recipe.gather_bytes
    during = ov.grad_reduce == "during_backward"
    out: dict[str, float] = {}

    def add(where: str, seconds: float) -> None:
        out[where] = out.get(where, 0.0) + seconds

    if zero == 0:
        total, piece = blockwise("all_reduce", grads)
        add("last_bwd" if during else "after", total)
        if during:
            add("bwd_piece", piece)
        return DPComm(**out)

    sync_each = zero >= 2 and (pp == 1 or ov.grad_sync_under_pipeline == "every_microbatch")
    rs, rs_piece = blockwise("reduce_scatter", grads)
    if sync_each and during:
        add("bwd_each", rs)
        add("bwd_piece", rs_piece)
    elif sync_each:
        add("bwd_blocking", rs)
    else:
        add("last_bwd" if during else "after", rs)
        if during:
            add("bwd_piece", rs_piece)

    fsdp = recipe.gathered_weights_bytes > 0 and zero >= recipe.weights.sharded_from
    ag, ag_piece = blockwise("all_gather", weights)
    if fsdp:
        kept = pp > 1 and ov.grad_sync_under_pipeline == "last_microbatch"
        resharded = zero >= 3 and ov.reshard_after_forward
        add("first_fwd" if kept else "fwd_each", ag)
        if resharded:
            add("bwd_each", ag)
        add("fwd_piece", ag_piece if ov.zero3_prefetch else ag)
    elif ov.param_gather == "next_forward":
        add("first_fwd", ag)
        add("fwd_piece", ag_piece)
    else:
        add("after", ag)
    return DPComm(**out)
