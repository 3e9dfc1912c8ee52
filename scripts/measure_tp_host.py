"""Host seconds DTensor tensor parallelism adds to each block per pass: per sharded projection, and per block under
sequence parallelism.

Under tensor parallelism (`meshplan run` and torchtitan: `parallelize_module` with ColwiseParallel / RowwiseParallel,
runtime/parallelize.py) every sharded projection runs as a DTensor op: its input converted with `from_local`, the
op dispatched through sharding propagation, its output turned back with `to_local`, and the same again in the
backward. With sequence parallelism the norms (SequenceParallel) and the inputs of attention and MLP
(PrepareModuleInput) add their own conversions. That is host work, on top of the per-op cost of eager PyTorch; where
the host sets a pass's pace (small blocks, short micro-batches, and always on a CPU) it shows in the step.

This times the runtime's own blocks (gpt-tiny: 6 sharded projections; llama-tiny: 7) on one CPU process (gloo,
a mesh of one: the collectives are trivial, what remains is the DTensor machinery) plain, under tensor parallelism
and under tensor + sequence parallelism, and fits seconds = per_projection x projections per block and pass, the
sequence-parallel part as seconds per block. A GPU host is faster or slower than this one; the figures are this
CPU's. Output: the `host.tp_dtensor` block of cluster_specs/engines/{meshplan,torchtitan}.yaml.

    python scripts/measure_tp_host.py            # median of 5 repetitions
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist

STEPS, WARMUP = 30, 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pass_seconds(name: str, tp: bool, sp: bool) -> tuple[float, float]:
    """Median (forward, backward) seconds per block of a chunk of blocks of preset `name`, on 8 tokens."""
    from profiler.host import block_pass_seconds
    from runtime.parallelize import apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    def parallelise(chunk) -> None:
        apply_tensor_parallel(chunk, init_device_mesh("cpu", (1,)), sp, loss_parallel=False)
    return block_pass_seconds(name, torch.device("cpu"), parallelise if tp else None, steps=STEPS, warmup=WARMUP)


def projections(name: str) -> int:
    """Sharded projections of one block of preset `name` under the runtime's TP plan (its DTensor weights)."""
    from planner.presets import PRESETS
    from planner.cost.params import sharded_projections
    return sharded_projections(PRESETS[name], fused_projections=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = {}
    for name in ("gpt-tiny", "llama-tiny"):
        reps = [[pass_seconds(name, tp, sp) for tp, sp in ((False, False), (True, False), (True, True))]
                for _ in range(args.repeats)]
        (plain_f, plain_b), (tp_f, tp_b), (sp_f, sp_b) = (
            tuple(statistics.median(r[k][d] for r in reps) for d in (0, 1)) for k in range(3))
        rows[name] = (projections(name), tp_f - plain_f, tp_b - plain_b, sp_f - tp_f, sp_b - tp_b)
        print(f"{name}: {rows[name][0]} projections; plain {plain_f * 1e6:.0f} / {plain_b * 1e6:.0f} us, "
              f"TP +{rows[name][1] * 1e6:.0f} / +{rows[name][2] * 1e6:.0f} us, "
              f"SP +{rows[name][3] * 1e6:.0f} / +{rows[name][4] * 1e6:.0f} us per block (forward / backward)")
    n = [r[0] for r in rows.values()]
    per = [sum(r[k] * r[0] for r in rows.values()) / sum(x * x for x in n) for k in (1, 2)]   # through the origin
    sp = [statistics.mean(r[k] for r in rows.values()) for k in (3, 4)]
    print("  tp_dtensor:                       # scripts/measure_tp_host.py")
    print(f"    {{per_projection_forward_s: {per[0]:.3g}, per_projection_backward_s: {per[1]:.3g}, "
          f"sp_forward_s: {sp[0]:.3g}, sp_backward_s: {sp[1]:.3g}}}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
