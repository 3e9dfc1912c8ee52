"""Pipeline hops priced on their own links in the homogeneous cost model, against the schedule simulation
(planner/cost/schedule.py) with one delay per link: Llama-3-8B at tp 2, pp 8 on two DGX H100 nodes, whose
pipeline crosses InfiniBand once (stage 3 to 4) and NVLink on its six other hops."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.cost.model import CostModel
from planner.cost.schedule import simulate
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec

TP, PP = 2, 8
# stage s on node s % 2: every hop crosses nodes, each TP pair still inside one
ALTERNATING = tuple((s % 2) * 8 + (s // 2) * TP + t for s in range(PP) for t in range(TP))


def _cost(engine: str) -> CostModel:
    eng = load_engine(engine).model_copy(update={"schedules": ["gpipe", "1f1b", "interleaved"]})
    return CostModel(PRESETS["llama3-8b"], load_cluster("dgx-h100", nodes=2),
                     TrainingSpec(global_batch=32, seq_len=4096, precision="bf16"), engine=eng)


def _config(schedule: str) -> ParallelConfig:
    return ParallelConfig(tp=TP, pp=PP, dp=1, mbs=1, schedule=schedule, layers_per_stage=[4] * PP)


def _simulated(core, hops: tuple[float, ...] | None = None) -> float:
    """The simulated pipeline of a costed configuration's per-stage work, on its own hops or on `hops`."""
    w = core.work
    if hops is not None:
        w = replace(w, hops=hops)
    fwd = [[w.forward(i, c) for c in range(w.vpp)] for i in range(w.pp)]
    bwd = [[w.backward(i, c) for c in range(w.vpp)] for i in range(w.pp)]
    return simulate(core.cfg.schedule, core.nmb, fwd, bwd, w.link_delays).makespan


def test_hops_inside_a_node_ride_nvlink_and_the_one_across_rides_infiniband():
    """Alpha-beta per hop (latency + bytes / bandwidth): the hop across nodes costs the links' difference more
    than those inside, which are alike."""
    cost = _cost("meshplan")
    hops = cost.evaluate_core(_config("1f1b")).work.hops
    assert len(hops) == PP - 1
    inside = [c for h, c in enumerate(hops) if h != 3]
    assert inside == [inside[0]] * (PP - 2)
    c = cost.cluster
    nbytes = 1 * 4096 * 4096 * 4          # one micro-batch's activation: mbs x seq x hidden, the fp32 residual stream
    per_gpu_nic = c.inter_node.bandwidth * c.nics_per_node / c.gpus_per_node
    want = (c.inter_node.latency + nbytes / per_gpu_nic) - (c.intra_node.latency + nbytes / c.intra_node.bandwidth)
    assert hops[3] - inside[0] == pytest.approx(want, rel=1e-9)
    assert cost.evaluate_core(_config("1f1b"), devices=ALTERNATING).work.hops == (hops[3],) * (PP - 1)


@pytest.mark.parametrize("engine", ["meshplan", "megatron"])     # asynchronous and blocking transfers
def test_gpipe_with_mixed_hops_is_the_simulation(engine):
    """GPipe's closed form is exact with link delays and with transfers as device time: with hops of two speeds
    the model's pipeline time is the simulated one."""
    core = _cost(engine).evaluate_core(_config("gpipe"))
    assert len(set(core.work.hops)) == 2
    assert core.work.pipeline_s == pytest.approx(_simulated(core), rel=1e-12)


@pytest.mark.parametrize("engine", ["meshplan", "megatron"])
def test_intra_node_hops_save_what_the_simulation_saves(engine):
    """The same stages placed so that every hop crosses nodes (stage s on node s % 2) against the rank order
    (one hop across): the step falls by exactly what the simulated pipeline gains from the six NVLink hops,
    where pricing every hop at the slowest (the old model) charged both placements alike."""
    cost = _cost(engine)
    mixed, across = cost.evaluate_core(_config("gpipe")), cost.evaluate_core(_config("gpipe"), devices=ALTERNATING)
    slowest = (max(mixed.work.hops),) * (PP - 1)
    assert across.work.hops == slowest
    gain = _simulated(mixed, slowest) - _simulated(mixed)
    assert gain > 0
    assert across.step - mixed.step == pytest.approx(gain, rel=1e-9)
    assert across.time["pp_comm"] - mixed.time["pp_comm"] == pytest.approx(gain, rel=1e-9)


@pytest.mark.parametrize("engine", ["meshplan", "megatron"])
def test_1f1b_with_mixed_hops_stays_near_the_simulation(engine):
    """1F1B with four blocks per stage (the embedding and head unbalance the ends): the closed form with each
    hop on its own link stays within the 8% the unequal-stage forms promise (tests/test_pipeline_schedule.py),
    and below what the slowest hop everywhere would simulate."""
    core = _cost(engine).evaluate_core(_config("1f1b"))
    sim = _simulated(core)
    assert core.work.pipeline_s == pytest.approx(sim, rel=0.08)
    assert _simulated(core, (max(core.work.hops),) * (PP - 1)) > sim


def test_a_hop_costs_what_its_slowest_pipeline_pays():
    """With the pipeline innermost in the rank order (tp 2, pp 3, dp 4 on three 8-GPU nodes), pipeline k holds
    ranks 3k..3k+2: the first stays in node 0, but pipelines 2 (ranks 6-8) and 5 (ranks 15-17) cross a node
    boundary on hops 1 and 0. Each hop waits for its slowest pipeline, so both ride InfiniBand."""
    cost = CostModel(PRESETS["llama3-8b"], load_cluster("dgx-h100", nodes=3),
                     TrainingSpec(global_batch=32, seq_len=4096, precision="bf16"), engine=load_engine("meshplan"))
    cfg = ParallelConfig(tp=2, pp=3, dp=4, mbs=1, layers_per_stage=[11, 11, 10])
    c = cost.cluster
    nbytes = 1 * 4096 * 4096 * 4
    per_gpu_nic = c.inter_node.bandwidth * c.nics_per_node / c.gpus_per_node
    across = c.inter_node.latency + nbytes / per_gpu_nic
    pipeline_innermost = cost.evaluate_core(cfg, order=("pp", "tp", "dp")).work.hops
    tp_innermost = cost.evaluate_core(cfg).work.hops      # default order: each pipeline spans nodes 0, 1, 2
    assert pipeline_innermost[1] - pipeline_innermost[0] == pytest.approx(0.0, abs=1e-12)
    assert tp_innermost[0] == pytest.approx(pipeline_innermost[0], rel=1e-12)
    issue = cost.engine.host.per_collective_s           # the host's cost of issuing the send
    assert pipeline_innermost[0] == pytest.approx(across + issue, rel=1e-9)
