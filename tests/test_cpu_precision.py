"""On CPUs `meshplan run` computes in fp32 whatever the plan's precision (16-bit matmuls are far slower there),
so a plan for a gloo cluster is costed in fp32 and its run report's MFU counts the fp32 peak."""

from __future__ import annotations

import pytest

from planner.cost.flops import model_flops_per_step
from planner.cost.model import CostModel
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec
from runtime.report import build_report

MODEL = PRESETS["gpt-tiny"]
CONFIG = ParallelConfig(dp=2, mbs=2)


def predicted(precision: str, backend: str):
    cluster = load_cluster("cpu-local", nodes=1, gpus_per_node=2).model_copy(update={"backend": backend})
    training = TrainingSpec(global_batch=8, seq_len=64, precision=precision)
    cost = CostModel(MODEL, cluster, training)
    return cost, cost.evaluate(CONFIG)


def test_a_bf16_plan_on_cpus_is_costed_as_the_fp32_it_runs():
    _, bf16 = predicted("bf16", "gloo")
    _, fp32 = predicted("fp32", "gloo")
    assert bf16.predicted.step_time_s == fp32.predicted.step_time_s
    assert bf16.predicted.peak_memory_bytes == fp32.predicted.peak_memory_bytes
    # the spec's bf16 GEMM rate is 33x below its fp32 one: costed in bf16 the step would be 3x longer
    _, as_cuda = predicted("bf16", "nccl")
    assert as_cuda.predicted.step_time_s > 2 * bf16.predicted.step_time_s


def test_run_report_mfu_counts_the_peak_of_the_precision_run():
    cost, pred = predicted("bf16", "gloo")
    plan = make_plan(cost.model, cost.cluster, cost.training, pred, engine=cost.engine)
    ranks = [{"rank": r, "step_times_s": [1.0, 0.5, 0.5], "memory_kind": "cpu_peak_rss", "peak_memory_bytes": 1,
              "peak_reserved_bytes": None, "peak_memory_increase_bytes": 1} for r in range(2)]
    fp32_peak = cost.cluster.gpu.peak_flops["fp32"]
    flops = model_flops_per_step(MODEL, 8, 64)
    for run in ({"world_size": 2, "device": "cpu", "precision_run": "fp32"}, {"world_size": 2, "device": "cpu"}):
        report = build_report(plan, run, [6.0, 5.9, 5.8], ranks)
        assert report["measured"]["mfu"] == pytest.approx(flops / (0.5 * 2 * fp32_peak))
        assert report["measured"]["mfu"] == pytest.approx(pred.predicted.mfu * pred.predicted.step_time_s / 0.5)
