"""Data-parallel communication as an engine issues it: which collectives block the stream, which hide under
compute, and how much of a pass the parameter gathers can use (planner/cost/dp_comm.py, planner/cost/model.py)."""

from __future__ import annotations

import pytest

from planner.cost.dp_comm import exposed, stage_dp_comm
from planner.engine import load_engine, with_overrides
from planner.parallel_dims import ParallelDims


def one_second(op: str, nbytes: float) -> float:
    """A collective that takes one second per call whatever its size (hand counts below)."""
    return 1.0


@pytest.mark.parametrize("zero", [2, 3])
def test_reduction_after_backward_blocks_every_microbatch_without_pipeline(zero):
    """DeepSpeed without overlap_comm reduces in the backward's hooks, synchronously: with ZeRO-2/3 and no
    pipeline every micro-batch's reduce-scatter (one call per block and one for the ends) blocks the stream;
    an engine that reduces during the backward puts the same calls under the backward instead."""
    ds = load_engine("deepspeed")
    recipe = ds.recipe("fp16", zero, 8)
    c = stage_dp_comm(ds, recipe, zero, 8, 1, 1e9, 4, one_second)
    assert c.bwd_blocking == 5.0                  # 4 blocks + 1
    during = with_overrides(ds, {"overlap.grad_reduce": "during_backward"})
    c = stage_dp_comm(during, recipe, zero, 8, 1, 1e9, 4, one_second)
    assert c.bwd_blocking == 0.0
    assert c.bwd_each == (10.0 if zero == 3 else 5.0)      # ZeRO-3 adds the backward's re-gather


def test_gather_window_limits_what_hides():
    """exposed(comm, share * window): 10 s of gathers under 8 s of compute hide 8 s with the whole window, 4 s
    with half of it; what hides still costs the overlap slow-down."""
    assert exposed(10.0, 8.0, 0.1) == pytest.approx(2.0 + 0.8)
    assert exposed(10.0, 0.5 * 8.0, 0.1) == pytest.approx(6.0 + 0.4)


def test_zero3_step_prices_window_and_blocking_reduction():
    """The cost model's exposed ZeRO-3 time on one stage equals the hand sum of exposed(gathers, window x pass)
    per pass plus the blocking reduce-scatter (DeepSpeed engine, 2 nodes, no pipeline)."""
    from planner.cost.model import CostModel
    from planner.loaders import load_cluster
    from planner.presets import PRESETS
    from planner.specs import ParallelConfig, TrainingSpec
    ds = with_overrides(load_engine("deepspeed"), {"overlap.gather_window": 0.5})
    cluster = load_cluster("dgx-a100-80gb", nodes=2)
    training = TrainingSpec(global_batch=16, seq_len=1024, precision="fp16")
    cost = CostModel(PRESETS["gpt3-1.3b"], cluster, training, engine=ds)
    cfg = ParallelConfig(tp=1, pp=1, dp=16, mbs=1, zero=3, recompute="full")
    core = cost.evaluate_core(cfg)
    w = core.work
    dp_group = cost.group(ParallelDims(pp=1, dp=16, tp=1, order=core.order), "dp")
    layers = cost.model.num_layers
    c = cost.dp_comm(cfg, cost.device_params(cfg, 0, layers), layers, dp_group)
    assert c.bwd_blocking > 0 and c.fwd_each > 0
    blk, ends = w.blocks[0], w.ends
    fwd = layers * blk.forward.total + ds.host.per_microbatch_s + ends.emb_fwd.total + ends.head_fwd.total
    bwd = layers * (blk.backward.total + blk.recompute.total) + ends.emb_bwd.total + ends.head_bwd.total
    kappa = cluster.overlap_slowdown
    assert w.zero_fwd[0] == pytest.approx(exposed(c.fwd_each, 0.5 * fwd, kappa, c.fwd_piece))
    assert w.zero_bwd[0] == pytest.approx(exposed(c.bwd_each, 0.5 * bwd, kappa, c.bwd_piece) + c.bwd_blocking)


def test_deepspeed_one_rail_and_per_parameter_calls_only_under_zero3():
    """DeepSpeed's ZeRO-1 reduce-scatter and its parameter all-gather after the step: one flat bucket per block
    (plus the ends) on every rail; its ZeRO-3 reduce-scatter: one call per parameter tensor on one NIC (hand sums
    of Network.collective over the calls)."""
    from planner.cost.model import CostModel
    from planner.cost.params import tensors_per_block
    from planner.loaders import load_cluster
    from planner.presets import PRESETS
    from planner.specs import ParallelConfig, TrainingSpec
    ds = load_engine("deepspeed")
    cost = CostModel(PRESETS["gpt3-1.3b"], load_cluster("dgx-a100-80gb", nodes=2),
                     TrainingSpec(global_batch=16, seq_len=1024, precision="fp16"), engine=ds)
    layers = cost.model.num_layers
    for zero, calls, rails in ((1, layers + 1, 0),
                               (3, layers * tensors_per_block(cost.model, "projections" in ds.fused) + 1, 1)):
        cfg = ParallelConfig(tp=1, pp=1, dp=16, mbs=1, zero=zero, recompute="full")
        group = cost.group(ParallelDims(pp=1, dp=16, tp=1), "dp")
        params = cost.device_params(cfg, 0, layers)
        grads = params * cost.recipe(zero, 16).reduce_bytes
        weights = params * cost.recipe(zero, 16).gather_bytes
        rs = cost.net.collective("reduce_scatter", grads / calls, group, rails) + ds.host.per_collective_s
        ag = cost.net.collective("all_gather", weights / calls, group, rails) + ds.host.per_collective_s
        c = cost.dp_comm(cfg, params, layers, group)
        if zero == 1:
            assert c.after == pytest.approx(calls * (rs + ag))
        else:
            assert c.bwd_blocking == pytest.approx(calls * rs)
