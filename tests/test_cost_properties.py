"""Properties any sound cost model has, over random models, clusters and configurations (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from planner.cost.memory import block_activation_bytes
from planner.cost.model import CostModel
from planner.loaders import load_cluster
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec

CLUSTERS = ["dgx-a100-80gb", "dgx-h100", "hgx-h200", "dgx-a100-40gb"]


@st.composite
def models(draw):
    heads = draw(st.sampled_from([8, 16, 32]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4, 8, heads) if heads % h == 0]))
    llama = draw(st.booleans())
    return ModelSpec(num_layers=draw(st.integers(4, 48)), hidden_size=heads * draw(st.sampled_from([64, 128])),
                     num_heads=heads, num_kv_heads=kv if llama else None, vocab_size=draw(st.sampled_from([32000, 51200])),
                     max_position_embeddings=8192, mlp="swiglu" if llama else "gelu",
                     norm="rmsnorm" if llama else "layernorm", bias=not llama,
                     position_embedding="rope" if llama else "learned",
                     dropout=draw(st.sampled_from([0.0, 0.1])), attention_kernel=draw(st.sampled_from(["flash", "eager"])),
                     tied_embeddings=draw(st.booleans()))


@st.composite
def setups(draw):
    m = draw(models())
    cluster = load_cluster(draw(st.sampled_from(CLUSTERS)), nodes=draw(st.sampled_from([1, 2, 4])))
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if m.kv_heads % t == 0]))
    pp = draw(st.sampled_from([p for p in (1, 2, 4) if p <= m.num_layers]))
    dp = cluster.world_size // (tp * pp)
    assume(dp >= 1 and cluster.world_size % (tp * pp) == 0)
    mbs = draw(st.sampled_from([1, 2]))
    m_per = draw(st.sampled_from([1, 2, 4, 8]))
    training = TrainingSpec(global_batch=dp * mbs * pp * m_per, seq_len=draw(st.sampled_from([1024, 2048])),
                            precision=draw(st.sampled_from(["bf16", "fp16", "amp-bf16"])))
    cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=mbs, zero=draw(st.sampled_from([0, 1, 2, 3])),
                         recompute=draw(st.sampled_from(["none", "selective", "full"])),
                         sp=tp > 1 and draw(st.booleans()), schedule=draw(st.sampled_from(["gpipe", "1f1b"])))
    return m, cluster, training, cfg


def peak(m, cluster, training, cfg):
    return CostModel(m, cluster, training).evaluate(cfg).predicted.peak_memory_bytes


def fixed_layers(m, cfg):
    """Keep the layer split fixed across compared configs, so only the varied knob moves memory."""
    base, rest = divmod(m.num_layers, cfg.pp)
    return cfg.model_copy(update={"layers_per_stage": [base + (j < rest) for j in range(cfg.pp)]})


@given(setups())
@settings(max_examples=60, deadline=None)
def test_memory_non_decreasing_in_micro_batch(setup):
    m, cluster, training, cfg = setup
    cfg = fixed_layers(m, cfg)
    # the same number of micro-batches per step: the global batch grows with mbs
    k = training.global_batch // (cfg.dp * cfg.mbs)
    small = peak(m, cluster, training.model_copy(update={"global_batch": cfg.dp * k}),
                 cfg.model_copy(update={"mbs": 1}))
    large = peak(m, cluster, training.model_copy(update={"global_batch": cfg.dp * 2 * k}),
                 cfg.model_copy(update={"mbs": 2}))
    assert large >= small


@given(setups())
@settings(max_examples=60, deadline=None)
def test_memory_non_increasing_in_zero_stage(setup):
    m, cluster, training, cfg = setup
    cfg = fixed_layers(m, cfg)
    peaks = [peak(m, cluster, training, cfg.model_copy(update={"zero": z})) for z in (0, 1, 2, 3)]
    # ZeRO-3 holds two gathered blocks and one block's gradients: it saves memory once a stage's sharded
    # weights outweigh that, i.e. with enough blocks per stage (>= 8 at dp >= 4 for every recipe here)
    assert peaks[0] >= peaks[1] >= peaks[2]
    if cfg.dp >= 4 and min(cfg.layers_per_stage) >= 8:
        assert peaks[2] >= peaks[3]


@given(setups())
@settings(max_examples=60, deadline=None)
def test_memory_non_increasing_with_recompute(setup):
    """Recomputation keeps fewer activations; it can only raise a peak by bringing one block's recomputed
    activations back at the end of a backward (when gradients, not activations, fill the GPU)."""
    m, cluster, training, cfg = setup
    cfg = fixed_layers(m, cfg)
    cost = CostModel(m, cluster, training)
    dt = cost.dtypes(cfg.zero, cfg.dp)
    kept = {r: block_activation_bytes(cost.model, cfg.mbs, training.seq_len, cfg.tp, cfg.sp, r, dt, cost.opts)
            for r in ("none", "selective", "full")}
    none, sel, full = (peak(m, cluster, training, cfg.model_copy(update={"recompute": r}))
                       for r in ("none", "selective", "full"))
    assert kept["none"] >= kept["selective"] >= kept["full"]
    assert none + (kept["none"] - kept["selective"]) >= sel
    assert sel + (kept["selective"] - kept["full"]) >= full


@given(setups())
@settings(max_examples=40, deadline=None)
def test_single_gpu_time_is_compute_plus_optimizer(setup):
    m, cluster, training, cfg = setup
    one = cluster.resized(1, 1)
    cfg = cfg.model_copy(update={"tp": 1, "pp": 1, "dp": 1, "sp": False, "zero": 0, "recompute": "none",
                                 "schedule": "1f1b"})
    pred = CostModel(m, one, training).evaluate(cfg).predicted
    t = pred.time
    assert t.tp_comm == t.pp_comm == t.dp_comm_exposed == t.recompute == 0
    assert pred.step_time_s == pytest.approx(t.compute + t.optimizer + t.host, rel=1e-12)
    assert sum(pred.time.model_dump().values()) == pytest.approx(pred.step_time_s, rel=1e-9)


@given(setups())
@settings(max_examples=60, deadline=None)
def test_time_breakdown_sums_to_step_and_feasibility_matches_memory(setup):
    m, cluster, training, cfg = setup
    pred = CostModel(m, cluster, training).evaluate(cfg)
    p = pred.predicted
    assert sum(p.time.model_dump().values()) == pytest.approx(p.step_time_s, rel=1e-9)
    assert all(v >= 0 for v in p.time.model_dump().values())
    assert pred.feasible == (p.peak_reserved_bytes <= p.memory.budget_bytes)
    assert (pred.reason == "") == pred.feasible


@given(setups())
@settings(max_examples=40, deadline=None)
def test_gradient_reduction_after_backward_costs_its_full_time(setup):
    """Without overlap the ZeRO-0 all-reduce adds its whole alpha-beta time after the backward; with overlap
    at most that much, and with no data parallelism nothing changes."""
    m, cluster, training, cfg = setup
    cfg = cfg.model_copy(update={"zero": 0})
    on = CostModel(m, cluster, training).evaluate(cfg).predicted
    off = CostModel(m, cluster, training.model_copy(update={"overlap_grad_reduce": False})).evaluate(cfg).predicted
    assert off.step_time_s >= on.step_time_s * (1 - 1e-12)
    if cfg.dp == 1:
        assert off.step_time_s == pytest.approx(on.step_time_s, rel=1e-12)
