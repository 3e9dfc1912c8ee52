"""The 1F1B layer split against brute force: every contiguous split costed by the cost model's full evaluation.

Small GPTs on 12 DGX A100 nodes (96 GPUs), so the data-parallel groups of 24-48 ranks span nodes and their
gradient reduction and ZeRO gathers run over InfiniBand; 2-4 micro-batches, so what each stage leaves exposed
after its last backward is a large share of the step.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.partition import partition_layers
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from tests.test_partition import _compositions

NODES = 12


def _cost(engine: str, layers: int = 12, hidden: int = 2048, tied: bool = False, memory_gib: float | None = None,
          batch: int = 96, accumulation: str | None = None) -> CostModel:
    """`accumulation`: the engine's kernels.grad_accumulation replaced, and its gradients' copy into the reduction's
    buffer left out (default: the engine's own kernels)."""
    model = ModelSpec(num_layers=layers, hidden_size=hidden, num_heads=16, vocab_size=50304,
                      max_position_embeddings=2048, tied_embeddings=tied)
    cluster = load_cluster("dgx-a100-80gb", nodes=NODES)
    if memory_gib is not None:
        gpu = cluster.gpu.model_copy(update={"memory_bytes": int(memory_gib * 2 ** 30)})
        cluster = cluster.model_copy(update={"gpu_types": {cluster.nodes.gpu_type: gpu}})
    spec = load_engine(engine)
    if accumulation is not None:
        spec = spec.model_copy(update={"kernels": spec.kernels.model_copy(
            update={"grad_accumulation": accumulation, "reduce_copy_in": False})})
    return CostModel(model, cluster, TrainingSpec(global_batch=batch, seq_len=2048, precision="bf16"), engine=spec)


def _brute_force(cost: CostModel, cfg: ParallelConfig, fitting: bool = True) -> tuple[float, tuple[int, ...]] | None:
    """(step, split) of the fastest split (that fits, unless not `fitting`), over every split into cfg.pp
    positive parts."""
    best = None
    for split in _compositions(cost.model.num_layers, cfg.pp):
        pred = cost.evaluate(cfg.model_copy(update={"layers_per_stage": list(split)}), validate=False)
        if (pred.feasible or not fitting) and (best is None or pred.predicted.step_time_s < best[0]):
            best = (pred.predicted.step_time_s, split)
    return best


def _config(cost: CostModel, pp: int, zero: int, tp: int = 1, recompute: str = "none") -> ParallelConfig:
    return ParallelConfig(tp=tp, pp=pp, dp=cost.cluster.world_size // (tp * pp), mbs=1, zero=zero,
                          recompute=recompute)


def _time_only_split(cost: CostModel, cfg: ParallelConfig) -> list[int]:
    """The split before: min-max of each stage's compute per micro-batch (blocks, embedding, head)."""
    w = cost.evaluate_core(cfg).work
    extra = [0.0] * cfg.pp
    extra[0] += w.ends.emb_fwd.total + w.ends.emb_bwd.total
    extra[-1] += w.ends.head_fwd.total + w.ends.head_bwd.total
    return partition_layers(cost.model.num_layers, w.blocks[0].total, extra)


CASES = [(engine, zero, pp) for engine, zeros in (("meshplan", (0, 1, 3)), ("megatron", (0, 1)),
                                                  ("torchtitan", (2,)))
         for zero in zeros for pp in (2, 3, 4)]


@pytest.mark.parametrize("engine,zero,pp", CASES)
def test_default_split_is_the_brute_force_optimum(engine, zero, pp):
    cost = _cost(engine, tied=pp == 3)           # pp 3 with tied embeddings: their sync after the last backward
    cfg = _config(cost, pp, zero)
    chosen = cost.evaluate(cfg, validate=False)
    best = _brute_force(cost, cfg)
    assert chosen.feasible and best is not None
    assert math.isclose(chosen.predicted.step_time_s, best[0], rel_tol=1e-9), (chosen.config.layers_per_stage, best)


@pytest.mark.parametrize("engine,tp,pp,recompute,memory_gib,binds", [
    ("meshplan", 1, 4, "none", 10, True), ("meshplan", 1, 4, "none", 11, True), ("megatron", 1, 4, "none", 10, True),
    ("meshplan", 1, 4, "none", 14, False), ("megatron", 2, 4, "full", None, False)])
def test_split_under_memory_is_the_brute_force_optimum(engine, tp, pp, recompute, memory_gib, binds):
    """Where memory binds (a 4096-wide model on GPUs shrunk to 10-11 GiB: the fastest split does not fit) the
    split is the fastest that fits."""
    cost = _cost(engine, hidden=4096, memory_gib=memory_gib, batch=96 * tp)
    cfg = _config(cost, pp, 1, tp, recompute)
    chosen = cost.evaluate(cfg, validate=False)
    best = _brute_force(cost, cfg)
    assert best is not None and chosen.feasible
    assert math.isclose(chosen.predicted.step_time_s, best[0], rel_tol=1e-9), (chosen.config.layers_per_stage, best)
    assert (_brute_force(cost, cfg, fitting=False)[0] < best[0]) == binds


@pytest.mark.parametrize("engine,layers,zero,pp,tied,old,new", [
    ("meshplan", 11, 0, 3, True, [4, 5, 2], [3, 5, 3]),        # embedding and tied sync exposed on stage 0: -1.8%
    ("meshplan", 12, 0, 2, False, [7, 5], [4, 8])])            # the embedding's gradients come last: -1.1%
def test_the_time_only_split_was_slower(engine, layers, zero, pp, tied, old, new):
    """The split that balances compute alone leaves more DP communication exposed than the chosen one
    (gradients accumulated in the weight-gradient GEMMs and reduced in place, so that the blocks weigh what they
    weighed when these cases were chosen)."""
    cost = _cost(engine, layers=layers, tied=tied, accumulation="fused")
    cfg = _config(cost, pp, zero)
    assert _time_only_split(cost, cfg) == old
    chosen = cost.evaluate(cfg, validate=False)
    before = cost.evaluate(cfg.model_copy(update={"layers_per_stage": old}), validate=False)
    assert chosen.config.layers_per_stage == new
    assert chosen.predicted.step_time_s < before.predicted.step_time_s * (1 - 0.004)


@given(engine=st.sampled_from(["meshplan", "megatron", "torchtitan"]), zero=st.integers(0, 3),
       pp=st.integers(2, 4), tp=st.sampled_from([1, 2]), nodes=st.sampled_from([3, 6, 12]),
       layers=st.integers(5, 11), hidden=st.sampled_from([1024, 2048, 4096]), nmb=st.integers(1, 6),
       tied=st.booleans(), recompute=st.sampled_from(["none", "full"]))
@settings(max_examples=150, deadline=None)
def test_random_split_is_the_brute_force_optimum(engine, zero, pp, tp, nodes, layers, hidden, nmb, tied, recompute):
    """Random small GPTs, engines, ZeRO stages and micro-batch counts (one micro-batch included)."""
    model = ModelSpec(num_layers=layers, hidden_size=hidden, num_heads=16, vocab_size=50304,
                      max_position_embeddings=2048, tied_embeddings=tied)
    cluster = load_cluster("dgx-a100-80gb", nodes=nodes)
    dp = cluster.world_size // (tp * pp)
    if dp * tp * pp != cluster.world_size or pp > layers:
        return
    cost = CostModel(model, cluster, TrainingSpec(global_batch=dp * nmb, seq_len=2048, precision="bf16"),
                     engine=load_engine(engine))
    cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=1, zero=zero, recompute=recompute)
    chosen = cost.evaluate(cfg, validate=False)
    best = _brute_force(cost, cfg)
    if best is None:
        assert not chosen.feasible
        return
    assert chosen.feasible
    assert math.isclose(chosen.predicted.step_time_s, best[0], rel_tol=1e-9), (chosen.config.layers_per_stage, best)


def test_deepspeed_splits_the_blocks_itself():
    """DeepSpeed's PipelineModule partitions the transformer layers evenly itself (Megatron-DeepSpeed's
    GPTModelPipe: partition_method 'type:transformer'), the remainder on the first stages, so plans for it use
    that split, a list it cannot take is refused, and it is not searched with ZeRO-2/3 under pipelining (its
    PipelineEngine refuses them)."""
    from collections import Counter

    from planner.errors import InputError
    from planner.search.space import Constraints, enumerate_space
    cost = _cost("deepspeed", layers=14)
    cfg = _config(cost, 4, 1)
    assert cost.evaluate(cfg, validate=False).config.layers_per_stage == [4, 4, 3, 3]
    with pytest.raises(InputError, match="splits the blocks"):
        cost.evaluate(cfg.model_copy(update={"layers_per_stage": [3, 4, 4, 3]}))
    with pytest.raises(InputError, match="at most ZeRO-1 with pipeline"):
        cost.evaluate(_config(cost, 4, 3))
    space = list(enumerate_space(cost.model, cost.cluster, cost.training, Constraints(), Counter(), cost.engine))
    assert any(c.pp > 1 for c in space) and any(c.zero == 3 for c in space)
    assert all(c.zero <= 1 for c in space if c.pp > 1)


def _mixed_hop_cost(engine: str, nodes: int, layers: int, tied: bool = False, batch: int = 32) -> CostModel:
    model = ModelSpec(num_layers=layers, hidden_size=2048, num_heads=16, vocab_size=50304,
                      max_position_embeddings=2048, tied_embeddings=tied)
    return CostModel(model, load_cluster("dgx-a100-80gb", nodes=nodes),
                     TrainingSpec(global_batch=batch, seq_len=2048, precision="bf16"), engine=load_engine(engine))


@pytest.mark.parametrize("engine", ["meshplan", "megatron", "torchtitan"])
@pytest.mark.parametrize("tp,pp,zero,order", [(1, 4, 0, ("tp", "dp", "pp")), (2, 4, 1, ("tp", "dp", "pp")),
                                              (1, 8, 0, ("tp", "dp", "pp")), (2, 8, 1, ("dp", "tp", "pp"))])
def test_split_with_hops_inside_and_across_nodes_is_the_brute_force_optimum(engine, tp, pp, zero, order):
    """Pipelines on 2 DGX nodes whose hops are partly NVLink, partly InfiniBand (the pipeline stride is below
    a node): the split minimises the step with each hop on its own link, as brute force over every split."""
    cost = _mixed_hop_cost(engine, 2, 12, tied=pp == 4)
    cfg = ParallelConfig(tp=tp, pp=pp, dp=16 // (tp * pp), mbs=1, zero=zero, recompute="none")
    chosen = cost.evaluate(cfg, order, validate=False)
    hops = cost.evaluate_core(cfg, order).work.hops
    assert len(set(hops)) == 2 and max(hops) > 2 * min(hops)       # both kinds of link
    best = None
    for split in _compositions(12, pp):
        pred = cost.evaluate(cfg.model_copy(update={"layers_per_stage": list(split)}), order, validate=False)
        if pred.feasible and (best is None or pred.predicted.step_time_s < best[0]):
            best = (pred.predicted.step_time_s, split)
    assert chosen.feasible and best is not None
    assert math.isclose(chosen.predicted.step_time_s, best[0], rel_tol=1e-9), (chosen.config.layers_per_stage, best)
