"""FSDP2's copy of each all-gathered buffer into the unsharded parameters (engine.kernels.gather_copy_out):
counted on two gloo processes with torch.profiler (fsdp::split_with_sizes_copy once per micro-batch under
ZeRO-2, twice under ZeRO-3, over every parameter of the block), and priced as that many reads and writes of
the gathered bytes; and its copy of the gradients into each reduction's buffer (engine.kernels.reduce_copy_in),
recorded with their dtypes on the same two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from planner.cost.comm import Group
from planner.cost.model import CostModel, StateTraffic
from planner.cost.params import layer_params
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from tests.gloo_helpers import free_port

SMALL = ModelSpec(name="g", num_layers=2, hidden_size=64, num_heads=4, vocab_size=1000,
                  max_position_embeddings=32, dropout=0.0)


def _worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.profiler import profile

    from runtime.models import TransformerBlock
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    counts = {}
    for zero in (2, 3):
        block = TransformerBlock(SMALL)
        numel = sum(p.numel() for p in block.parameters())
        fully_shard(block, mesh=mesh, reshard_after_forward=zero == 3,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        x = torch.randn(2, 16, 64)
        block(x).float().sum().backward()
        with profile(record_shapes=True) as prof:
            block(x).float().sum().backward()
        copies = [e for e in prof.events() if e.name == "fsdp::split_with_sizes_copy"]
        counts[zero] = {"copies": len(copies), "numel": numel,
                        "copied": [torch.Size(e.input_shapes[0]).numel() for e in copies]}
    if rank == 0:
        Path(out).write_text(json.dumps(counts))
    dist.barrier()
    os._exit(0)          # as runtime/train.py leaves: gloo's teardown now and then aborts a rank


def _cost(engine: str = "meshplan") -> CostModel:
    model = ModelSpec(name="g", num_layers=8, hidden_size=4096, num_heads=32, vocab_size=51200,
                      max_position_embeddings=2048, dropout=0.0)
    return CostModel(model, load_cluster("dgx-h100"), TrainingSpec(global_batch=8, seq_len=2048, precision="bf16"),
                     engine=load_engine(engine))


def test_fsdp2_copies_each_gathered_block_out_once_per_gather(tmp_path):
    out = tmp_path / "counts.json"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2)
    counts = {int(k): v for k, v in json.loads(out.read_text()).items()}
    cost = _cost()
    for zero, seen in counts.items():
        assert all(n == seen["numel"] == layer_params(SMALL).total for n in seen["copied"])
        traffic = cost.state_traffic(ParallelConfig(dp=8, mbs=1, zero=zero), 1)
        priced = (traffic.gather_forward > 0) + (traffic.gather_backward > 0)
        assert seen["copies"] == priced == (2 if zero == 3 else 1)
        assert traffic.gather_forward == 4        # a bf16 read and write per parameter


@pytest.mark.parametrize("engine, cfg", [("megatron", ParallelConfig(dp=8, mbs=1, zero=3)),   # gathers in place
                                         ("meshplan", ParallelConfig(dp=8, mbs=1, zero=0)),   # nothing gathered
                                         ("meshplan", ParallelConfig(tp=8, dp=1, mbs=1, zero=3))])
def test_no_copy_without_a_gather_into_a_flat_buffer(engine, cfg):
    traffic = _cost(engine).state_traffic(cfg, 1)
    assert traffic.gather_forward == traffic.gather_backward == 0


def test_the_copy_costs_its_bytes_over_the_elementwise_bandwidth():
    cost = _cost()
    tp_group, dt = Group((0,), 8), cost.dtypes(3, 8)
    plain = cost.block(1, 1, False, "none", tp_group, dt)
    copied = cost.block(1, 1, False, "none", tp_group, dt, traffic=StateTraffic(4.0, 4.0, 0.0))
    gpu = cost.gpu
    moved = layer_params(cost.model).total * 4.0 / (gpu.hbm_bandwidth * gpu.efficiency.memory)
    assert copied.forward.compute - plain.forward.compute == pytest.approx(moved, rel=1e-9)
    assert copied.backward.compute - plain.backward.compute == pytest.approx(moved, rel=1e-9)


# ------------------------------------------------------------------ the gradients' copy into the reduction's buffer
def _reduce_worker(rank: int, port: int, out: str) -> None:
    """Two micro-batches per step with FSDP2 mixed precision (bf16 parameters, fp32 reduction), gradient sync
    as runtime/pipeline.py sets it (the last micro-batch only at ZeRO 0-1, each one at ZeRO 2-3): every copy of a
    step's gradients into a reduction's buffer (FSDP2's foreach_reduce_scatter_copy_in, fsdp::chunk_cat), with
    the dtype and elements it read and wrote."""
    import os

    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as collectives
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from runtime.models import TransformerBlock
    from runtime.parallelize import set_gradient_sync
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    seen: list[dict] = []
    copy_in = collectives.foreach_reduce_scatter_copy_in

    def recorded(grads, buffer, world_size):
        seen.append({"read": sorted({str(g.dtype) for g in grads}), "elements": sum(g.numel() for g in grads),
                     "written": str(buffer.dtype), "buffer": buffer.numel()})
        return copy_in(grads, buffer, world_size)
    collectives.foreach_reduce_scatter_copy_in = recorded
    counts = {}
    for zero in (1, 2, 3):
        block = TransformerBlock(SMALL)
        fully_shard(block, mesh=mesh, reshard_after_forward=zero == 3,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        x = torch.randn(2, 16, 64)

        def step():
            for i in range(2):
                set_gradient_sync(block, i == 1 or zero >= 2)
                block(x).float().sum().backward()
        step()
        seen.clear()
        step()
        counts[zero] = list(seen)
    if rank == 0:
        Path(out).write_text(json.dumps(counts))
    dist.barrier()
    os._exit(0)          # as runtime/train.py leaves: gloo's teardown now and then aborts a rank


def test_fsdp2_copies_the_gradients_into_the_reduction_buffer_once_per_reduction(tmp_path):
    """What reduce_copy_bytes prices, against what FSDP2 copies in a step of two micro-batches: ZeRO-1 one copy
    of the fp32 accumulator (read 4, written 4 bytes per element, once per step: 4 per micro-batch on average),
    ZeRO-2/3 one copy of each micro-batch's fresh bf16 gradient (read 2, written 4: 6 per micro-batch)."""
    out = tmp_path / "counts.json"
    mp.spawn(_reduce_worker, args=(free_port(), str(out)), nprocs=2)
    counts = {int(k): v for k, v in json.loads(out.read_text()).items()}
    size = {"torch.bfloat16": 2, "torch.float32": 4}
    cost = _cost()
    for zero, copies in counts.items():
        assert all(c["elements"] == c["buffer"] == layer_params(SMALL).total for c in copies), copies
        moved = sum(size[c["read"][0]] + size[c["written"]] for c in copies) / 2      # per micro-batch
        assert all(len(c["read"]) == 1 for c in copies)
        assert len(copies) == (1 if zero == 1 else 2)
        assert cost.reduce_copy_bytes(ParallelConfig(dp=8, mbs=1, zero=zero), 2) == moved


@pytest.mark.parametrize("engine, cfg", [("megatron", ParallelConfig(dp=8, mbs=1, zero=1)),   # reduced in place
                                         ("meshplan", ParallelConfig(tp=8, dp=1, mbs=1, zero=3))])  # no reduction
def test_no_reduce_copy_without_a_copy_into_a_flat_buffer(engine, cfg):
    assert _cost(engine).reduce_copy_bytes(cfg, 2) == 0.0
