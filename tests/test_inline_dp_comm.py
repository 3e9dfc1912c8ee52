"""On a device without streams FSDP2 cannot overlap its data-parallel collectives: it issues them blocking
(`dist.all_reduce`, `reduce_scatter_single`, `all_gather_single` without async_op) and relies on a side
stream to run them beside compute. The engine files name the ZeRO stages where that holds
(overlap.dp_on_side_stream) and the cost model then exposes all of that communication on a CPU. Recorded here on
two gloo processes, over the runtime's own wrappers (runtime/parallelize.py: FSDP2's replicate for ZeRO 0,
fully_shard for ZeRO 1-3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from tests.gloo_helpers import free_port

SMALL = ModelSpec(name="g", num_layers=2, hidden_size=64, num_heads=4, vocab_size=1000,
                  max_position_embeddings=32, dropout=0.0)
# torch.distributed's entry points FSDP2 calls (torch 2.13: the *_single forms; earlier: *_tensor)
OPS = ("all_reduce", "reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor", "all_gather_into_tensor")


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from runtime.models import ModelChunk
    from runtime.parallelize import apply_data_parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    calls: list[dict] = []

    def recording(name, original):
        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append({"op": name, "async_op": bool(kwargs.get("async_op", False)), "zero": zero})
            return result
        return call

    for name in OPS:
        if hasattr(dist, name):
            setattr(dist, name, recording(name, getattr(dist, name)))
    for zero in (0, 1, 2, 3):
        chunk = ModelChunk(SMALL, [0, 1], first=True, last=True)
        apply_data_parallel(chunk, mesh, zero, MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                    reduce_dtype=torch.float32))
        tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
        for _ in range(2):
            chunk(tokens).float().sum().backward()
    if rank == 0:
        Path(out).write_text(json.dumps(calls))
    dist.barrier()
    os._exit(0)          # as runtime/train.py leaves: gloo's teardown now and then aborts a rank


def test_fsdp2_runs_its_data_parallel_collectives_blocking_on_cpu(tmp_path):
    out = tmp_path / "calls.json"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2)
    calls = json.loads(out.read_text())
    for zero in (0, 1, 2, 3):
        mine = [c for c in calls if c["zero"] == zero]
        assert mine, f"ZeRO {zero}: no data-parallel collective recorded"
        assert not any(c["async_op"] for c in mine), f"ZeRO {zero}: {mine}"
    assert {c["op"] for c in calls if c["zero"] == 0} == {"all_reduce"}
    assert {c["op"] for c in calls if c["zero"] == 3} & {"reduce_scatter_single", "reduce_scatter_tensor"}
    # the meshplan engine runs every stage so; torchtitan's ZeRO 0 is DDP (asynchronous work objects)
    assert load_engine("meshplan").overlap.dp_on_side_stream == [0, 1, 2, 3]
    assert load_engine("torchtitan").overlap.dp_on_side_stream == [2, 3]


@pytest.mark.parametrize("engine, zero, cluster, inline", [
    ("meshplan", 0, "cpu-local", True), ("meshplan", 3, "cpu-local", True), ("torchtitan", 0, "cpu-local", False),
    ("torchtitan", 3, "cpu-local", True), ("meshplan", 3, "dgx-h100", False), ("megatron", 1, "dgx-a100-80gb", False),
])
def test_a_cpu_exposes_the_collectives_an_engine_overlaps_through_a_side_stream(engine, zero, cluster, inline):
    spec = load_cluster(cluster)
    cost = CostModel(SMALL, spec, TrainingSpec(global_batch=8, seq_len=32, precision="fp32"),
                     engine=load_engine(engine))
    assert cost.dp_overlap_slowdown(zero) == (1.0 if inline else spec.overlap_slowdown)
    # and the step grows by the difference: all of the overlapped communication is paid
    if inline:
        cfg = ParallelConfig(dp=2, mbs=1, zero=zero)
        core = cost.evaluate_core(cfg)
        overlapped = CostModel(SMALL, spec.model_copy(update={"overlap_slowdown": 1.0}),
                               TrainingSpec(global_batch=8, seq_len=32, precision="fp32"),
                               engine=load_engine(engine)).evaluate_core(cfg)
        assert core.step == pytest.approx(overlapped.step, rel=1e-12)
