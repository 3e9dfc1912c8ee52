"""The cost model's memory timeline (planner/cost/timeline.py, the meshplan engine) against the bytes of the
runtime's actual tensors, counted on CPU at each phase of a training step by profiler.memory_trace.

For every configuration the runtime can run here (one process; two gloo processes for data and pipeline
parallelism), the step's peak on each rank (step 2) must be within 3% of the prediction for its pipeline stage,
and the peak of each phase (forward, backward, optimizer step) within 4%. The optimizer runs foreach, as on CUDA.
On CPU, FSDP2 gathers a block's parameters only when its forward starts (gloo collectives are synchronous),
so ZeRO-3 is costed without the next block's prefetched copy (`zero3_prefetch: false`).
"""

from __future__ import annotations

import pytest

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec

TOLERANCE = 0.03          # the step's peak
PHASE_TOLERANCE = 0.04    # each phase's peak
MODEL = PRESETS["gpt-tiny"].model_copy(update={"tied_embeddings": False})
PHASES = ("forward", "backward", "optimizer")


def cpu_engine():
    engine = load_engine("meshplan")
    return engine.model_copy(update={"overlap": engine.overlap.model_copy(update={"zero3_prefetch": False})})


def plan_and_prediction(gpus: int, precision: str, batch: int, **config):
    # the traces run the CUDA precision recipes on CPU (cuda_precision=True), so they are costed as on a CUDA
    # cluster: on a gloo one the cost model, like `meshplan run`, computes in fp32 whatever the precision
    cluster = load_cluster("cpu-local", nodes=1, gpus_per_node=gpus).model_copy(update={"backend": "nccl"})
    training = TrainingSpec(global_batch=batch, seq_len=32, precision=precision)
    cost = CostModel(MODEL, cluster, training, engine=cpu_engine())
    pred = cost.evaluate(ParallelConfig(**config))
    return make_plan(cost.model, cluster, training, pred, engine=cost.engine), pred


def measured_phases(trace: dict) -> dict[str, float]:
    """Step 2's largest peak of each phase."""
    peaks: dict[str, float] = {}
    for r in trace["records"]:
        if r["step"] == 2 and r["phase"] in PHASES:
            peaks[r["phase"]] = max(peaks.get(r["phase"], 0.0), r["peak_bytes"])
    return peaks


def check(name: str, plan, pred, traces: list[dict]) -> None:
    for rank, trace in enumerate(traces):
        stage = next(e.pp for e in plan.rank_layout if e.rank == rank)
        predicted = pred.predicted.memory.stages[stage]
        measured = measured_phases(trace)
        for phase in PHASES:
            assert predicted.phases[phase] == pytest.approx(measured[phase], rel=PHASE_TOLERANCE), \
                (name, rank, phase, predicted.phases[phase], measured[phase])
        assert predicted.total == pytest.approx(max(measured.values()), rel=TOLERANCE), (name, rank)
        top = sorted(measured.values())
        if top[-1] > top[-2] * (1 + 2 * TOLERANCE):      # a clear winner: the model must name it
            assert predicted.peak_phase == max(measured, key=measured.get), (name, rank, measured)


ONE_RANK = {
    "fp32, one micro-batch of 8": ("fp32", 8, dict(mbs=8)),
    "fp32, one sequence (the optimizer step peaks)": ("fp32", 1, dict(mbs=1)),
    "fp32, two micro-batches": ("fp32", 8, dict(mbs=4)),
    "fp32, full recompute": ("fp32", 8, dict(mbs=8, recompute="full")),
    "amp-bf16 (autocast)": ("amp-bf16", 8, dict(mbs=8)),
}


@pytest.mark.parametrize("name", list(ONE_RANK))
def test_one_rank_phases_match_the_runtimes_tensors(name):
    from profiler.memory_trace import trace_in_process
    precision, batch, config = ONE_RANK[name]
    plan, pred = plan_and_prediction(1, precision, batch, **config)
    check(name, plan, pred, [trace_in_process(plan, steps=2, foreach=True, cuda_precision=True)])


TWO_RANKS = {
    "ZeRO-0 (replicate)": ("fp32", 8, dict(dp=2, mbs=2, zero=0)),
    "ZeRO-1": ("fp32", 8, dict(dp=2, mbs=2, zero=1)),
    "ZeRO-2": ("fp32", 8, dict(dp=2, mbs=2, zero=2)),
    "ZeRO-3": ("fp32", 8, dict(dp=2, mbs=2, zero=3)),
    "ZeRO-3, bf16 FSDP2 mixed precision": ("bf16", 8, dict(dp=2, mbs=2, zero=3)),
    "ZeRO-1, bf16 FSDP2 mixed precision": ("bf16", 8, dict(dp=2, mbs=4, zero=1)),
    "pp 2, 1F1B": ("fp32", 8, dict(pp=2, mbs=2, layers_per_stage=[2, 2])),
    "pp 2, GPipe": ("fp32", 8, dict(pp=2, mbs=2, schedule="gpipe", layers_per_stage=[2, 2])),
    "tp 2": ("fp32", 8, dict(tp=2, mbs=4)),
    "tp 2 + SP": ("fp32", 32, dict(tp=2, mbs=32, sp=True)),   # activations 3/4 of the peak: what SP saves
}


@pytest.fixture(scope="module")
def two_rank_traces():
    from profiler.memory_trace import launch_traces
    plans = {name: plan_and_prediction(2, p, b, **c) for name, (p, b, c) in TWO_RANKS.items()}
    jobs = [{"name": name, "plan": plan, "steps": 2, "foreach": True, "cuda_precision": True}
            for name, (plan, _) in plans.items()]
    return plans, launch_traces(jobs, nproc=2)


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_rank_phases_match_the_runtimes_tensors(two_rank_traces, name):
    plans, traces = two_rank_traces
    plan, pred = plans[name]
    check(name, plan, pred, traces[name])
