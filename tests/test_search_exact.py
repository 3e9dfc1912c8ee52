"""The search returns the top of an exhaustive enumeration under the same cost model."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.layout import DEFAULT_ORDER
from planner.loaders import load_cluster
from planner.search.search import search
from planner.search.space import Constraints, enumerate_space
from planner.specs import ModelSpec, MoESpec, TrainingSpec


def exhaustive(model, cluster, training, constraints, k):
    """Cost every candidate; keep the feasible ones, one per (config, score) as the search does; then rank
    them by brute force under the README's rule: step times within 1% tie, and the tie goes to the one
    reserving the least memory (then the faster, then the first enumerated), again and again."""
    cost = CostModel(model, cluster, training)
    rows, seen = [], set()
    for i, cand in enumerate(enumerate_space(model, cluster, training, constraints, Counter())):
        core = cost.evaluate_core(cand, cand.order)
        twin = (cand._replace(order=DEFAULT_ORDER), (core.step, core.peak_reserved))
        if core.feasible and twin not in seen:
            seen.add(twin)
            rows.append((core, i))
    out = []
    while rows and len(out) < k:
        fastest = min(core.step for core, _ in rows)
        ties = [row for row in rows if row[0].step <= fastest * 1.01]
        pick = min(ties, key=lambda row: (row[0].peak_reserved, row[0].step, row[1]))
        rows.remove(pick)
        out.append(pick[0])
    return out


@st.composite
def problems(draw):
    heads = draw(st.sampled_from([4, 8, 16]))
    llama = draw(st.booleans())
    model = ModelSpec(num_layers=draw(st.integers(2, 12)), hidden_size=heads * draw(st.sampled_from([64, 128, 256])),
                      num_heads=heads, num_kv_heads=(heads // 2 if llama else None), vocab_size=32000,
                      max_position_embeddings=4096, mlp="swiglu" if llama else "gelu",
                      attention_kernel=draw(st.sampled_from(["flash", "eager"])), dropout=draw(st.sampled_from([0, .1])))
    gpn = draw(st.sampled_from([2, 4, 8]))
    cluster = load_cluster(draw(st.sampled_from(["dgx-a100-40gb", "dgx-h100"])), nodes=draw(st.sampled_from([1, 2])),
                           gpus_per_node=gpn)
    # memory pressure from a tight GPU makes some candidates infeasible
    gpu = cluster.gpu.model_copy(update={"memory_bytes": draw(st.sampled_from([4, 8, 80])) * 2 ** 30})
    cluster = cluster.model_copy(update={"gpu_types": {cluster.nodes.gpu_type: gpu}})
    training = TrainingSpec(global_batch=draw(st.sampled_from([8, 16, 32])), seq_len=draw(st.sampled_from([512, 2048])),
                            precision=draw(st.sampled_from(["bf16", "fp16"])))
    return model, cluster, training


@st.composite
def moe_problems(draw):
    """Mixture-of-experts models (every layer or every second one, after a dense first one or not) on one or two
    small nodes: stages of different kinds of layers."""
    heads = draw(st.sampled_from([4, 8]))
    experts = draw(st.sampled_from([4, 8]))
    moe = MoESpec(num_experts=experts, top_k=draw(st.sampled_from([1, 2])),
                  expert_ffn_size=heads * draw(st.sampled_from([64, 128])),
                  shared_experts=draw(st.sampled_from([0, 1])), first_dense_layers=draw(st.sampled_from([0, 1])),
                  every=draw(st.sampled_from([1, 1, 2])))
    model = ModelSpec(num_layers=draw(st.integers(2, 8)), hidden_size=heads * 64, num_heads=heads,
                      num_kv_heads=heads // 2, ffn_hidden_size=heads * 128, vocab_size=32000,
                      max_position_embeddings=4096, mlp="swiglu", norm="rmsnorm", bias=False,
                      position_embedding="rope", dropout=0.0, moe=moe)
    cluster = load_cluster("dgx-h100", nodes=draw(st.sampled_from([1, 2])), gpus_per_node=draw(st.sampled_from([4, 8])))
    gpu = cluster.gpu.model_copy(update={"memory_bytes": draw(st.sampled_from([2, 4, 80])) * 2 ** 30})
    cluster = cluster.model_copy(update={"gpu_types": {cluster.nodes.gpu_type: gpu}})
    training = TrainingSpec(global_batch=draw(st.sampled_from([16, 32])), seq_len=draw(st.sampled_from([512, 2048])))
    return model, cluster, training


@given(moe_problems(), st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_moe_search_over_ep_equals_exhaustive_enumeration(problem, k):
    """The same exactness with expert parallelism in the space: every ep dividing dp and the expert count."""
    model, cluster, training = problem
    result = search(model, cluster, training, Constraints(), top_k=k)
    expected = exhaustive(model, cluster, training, Constraints(), k)
    assert [round(c.step, 12) for c in result.top] == [round(c.step, 12) for c in expected]
    assert [c.peak_reserved for c in result.top] == pytest.approx([c.peak_reserved for c in expected])
    for core in result.top:
        assert core.cfg.dp % core.cfg.ep == 0 and model.moe.num_experts % core.cfg.ep == 0
    eps = {cand.ep for cand in enumerate_space(model, cluster, training, Constraints(), Counter())}
    assert eps == {e for e in (1, 2, 4, 8) if e <= model.moe.num_experts and any(
        cand.dp % e == 0 for cand in enumerate_space(model, cluster, training, Constraints(), Counter()))}


@given(problems(), st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_search_equals_exhaustive_enumeration(problem, k):
    model, cluster, training = problem
    result = search(model, cluster, training, Constraints(), top_k=k)
    expected = exhaustive(model, cluster, training, Constraints(), k)
    assert [round(c.step, 12) for c in result.top] == [round(c.step, 12) for c in expected]
    assert [c.peak_reserved for c in result.top] == pytest.approx([c.peak_reserved for c in expected])
    if expected:
        assert result.top[0].cfg == expected[0].cfg
    assert result.evaluated <= result.candidates


@given(problems())
@settings(max_examples=25, deadline=None)
def test_the_winner_has_the_most_headroom_of_the_ties(problem):
    """Of every feasible configuration within 1% of the fastest, the winner reserves the least memory, and it
    leaves the memory headroom free."""
    model, cluster, training = problem
    cost = CostModel(model, cluster, training, memory_headroom=0.2)
    result = search(model, cluster, training, Constraints(), top_k=1, cost=cost)
    feasible = [core for cand in enumerate_space(model, cluster, training, Constraints(), Counter())
                if (core := cost.evaluate_core(cand, cand.order)).feasible]
    if not feasible:
        assert not result.top
        return
    fastest = min(core.step for core in feasible)
    (winner,) = result.top
    assert winner.step <= fastest * 1.01 * (1 + 1e-12)
    assert winner.peak_reserved == min(c.peak_reserved for c in feasible if c.step <= fastest * 1.01)
    assert winner.peak_reserved <= 0.8 * cost.usable_bytes


@given(problems())
@settings(max_examples=25, deadline=None)
def test_pinned_degrees_are_respected(problem):
    model, cluster, training = problem
    pins = Constraints(tp=2 if model.kv_heads % 2 == 0 else 1, recompute="full", zero=1)
    result = search(model, cluster, training, pins, top_k=3)
    for core in result.top:
        assert core.cfg.tp == pins.tp and core.cfg.recompute == "full" and core.cfg.zero == 1
    expected = exhaustive(model, cluster, training, pins, 3)
    assert [round(c.step, 12) for c in result.top] == [round(c.step, 12) for c in expected]


@given(st.one_of(problems(), moe_problems()), st.sampled_from(["meshplan", "megatron", "deepspeed", "torchtitan"]))
@settings(max_examples=30, deadline=None)
def test_the_bounds_never_exceed_the_costed_step(problem, engine):
    """Branch and bound is exact only if no candidate's time and memory bounds exceed what it costs, under every
    engine (e.g. a pipeline whose device 0 holds few blocks ends the step with its own light optimizer step, not
    the mean device's)."""
    model, cluster, training = problem
    spec = load_engine(engine)
    if training.precision not in spec.memory:        # the engine's own precision (the CLI refuses the others)
        training = training.model_copy(update={"precision": "bf16"})
    cost = CostModel(model, cluster, training, engine=spec)
    for cand in enumerate_space(model, cluster, training, Constraints(), Counter(), spec):
        core = cost.evaluate_core(cand, cand.order)
        time_bound, memory_bound = cost.bounds(cand, cand.order)
        assert time_bound <= core.step * (1 + 1e-9), cand
        if core.feasible:
            assert memory_bound <= core.peak_reserved * (1 + 1e-9), cand


def test_a_light_first_stage_keeps_the_bound_below_the_step():
    """The case that found the optimizer-step term inadmissible: 2 + 9 blocks, one micro-batch, GPipe."""
    model = ModelSpec(num_layers=11, hidden_size=2048, num_heads=8, num_kv_heads=4, vocab_size=32000,
                      max_position_embeddings=4096, mlp="swiglu", attention_kernel="flash", dropout=0.0)
    cluster = load_cluster("dgx-a100-40gb", nodes=1, gpus_per_node=4)
    gpu = cluster.gpu.model_copy(update={"memory_bytes": 8 * 2 ** 30})
    cluster = cluster.model_copy(update={"gpu_types": {cluster.nodes.gpu_type: gpu}})
    training = TrainingSpec(global_batch=8, seq_len=512, precision="bf16")
    pins = Constraints(tp=2, recompute="full", zero=1)
    result = search(model, cluster, training, pins, top_k=3)
    expected = exhaustive(model, cluster, training, pins, 3)
    assert [round(c.step, 12) for c in result.top] == [round(c.step, 12) for c in expected]


def test_limits_are_respected():
    model = ModelSpec(num_layers=8, hidden_size=1024, num_heads=16, vocab_size=32000, max_position_embeddings=2048)
    cluster = load_cluster("dgx-a100-80gb", nodes=2)
    training = TrainingSpec(global_batch=64, seq_len=2048)
    result = search(model, cluster, training, Constraints(max_tp=2, max_pp=2, max_zero=2, max_mbs=2), top_k=10)
    assert result.top
    for core in result.top:
        c = core.cfg
        assert c.tp <= 2 and c.pp <= 2 and c.zero <= 2 and c.mbs <= 2
