"""Measured layer costs (a model profile) replace the analytical ones where they match."""

from __future__ import annotations

import pytest

from planner.cost.kernels import Dtypes, KernelOptions, block_work, isolated_time, pass_time
from planner.cost.memory import block_activation_bytes
from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.parallel_dims import ParallelDims
from planner.presets import PRESETS
from planner.profile_data import BlockMeasurement, DeviceInfo, ModelProfile
from planner.specs import ParallelConfig, TrainingSpec

MODEL = PRESETS["llama3.2-1b"]
CLUSTER = load_cluster("dgx-h100", nodes=1)
TRAINING = TrainingSpec(global_batch=64, seq_len=2048, precision="bf16")


ENGINE = load_engine("meshplan")
# DTensor's host seconds under TP and a checkpointed region's entry are added to a measured block (`profile
# model` times plain shards without checkpointing): left out where a test checks the replacement itself
# (tests/test_tp_host.py and tests/test_checkpoint_host.py price them)
NO_DTENSOR = ENGINE.model_copy(update={"host": ENGINE.host.model_copy(update={"tp_dtensor": None,
                                                                           "checkpoint_forward_s": 0.0})})
BF16 = Dtypes.of("bf16")


def analytical(tp, mbs, recompute="none", alone=False):
    """The cost model's own block numbers at bf16 (kernels, host costs and kept bytes of the meshplan engine):
    the profiles below scale them, so the test checks the replacement, not the kernel model. `alone`: each pass
    timed by itself from an idle device, as `profile model` times it; otherwise the steady state of the step."""
    opts, (host_f, host_b) = KernelOptions.of(ENGINE), ENGINE.host_per_kernel
    host_r = host_f * ENGINE.host.recompute_kernel_factor          # the replay of a checkpointed block
    w = block_work(MODEL, mbs, 2048, tp, False, recompute, BF16, opts)
    gpu = CLUSTER.gpu
    if alone:
        times = (isolated_time([(w.forward, host_f)], gpu, "bf16"),
                 isolated_time([(w.recompute, host_r), (w.backward, host_b)], gpu, "bf16"))
    else:
        times = (pass_time(w.forward, gpu, "bf16", host_f),
                 pass_time(w.backward, gpu, "bf16", host_b) + pass_time(w.recompute, gpu, "bf16", host_r))
    return (*times, block_activation_bytes(MODEL, mbs, 2048, tp, False, recompute, BF16, opts))


def profile(scale_time: float, scale_bytes: float, points=((1, 1), (2, 1), (1, 2)), model=MODEL, seq=2048):
    blocks = []
    for tp, mbs in points:
        f, b, a = analytical(tp, mbs, alone=True)
        blocks.append(BlockMeasurement(tp=tp, mbs=mbs, recompute="none", forward_s=f * scale_time,
                                       backward_s=b * scale_time, activation_bytes=int(a * scale_bytes)))
    return ModelProfile(model=model, precision="bf16", seq_len=seq,
                        device=DeviceInfo(type="cuda", name=CLUSTER.gpu.name, torch_version="2.13.0"), blocks=blocks)


def test_measured_point_replaces_the_analytical_one():
    cost = CostModel(MODEL, CLUSTER, TRAINING, profile(1.5, 1.2), "p.json", engine=NO_DTENSOR)
    tp_group = cost.group(ParallelDims(tp=2, dp=4), "tp")
    blk = cost.block(2, 1, False, "none", tp_group, BF16)
    f, b, a = analytical(2, 1)
    assert blk.forward.compute == pytest.approx(1.5 * f)
    assert blk.backward.compute == pytest.approx(1.5 * b)
    assert blk.activation_bytes == pytest.approx(1.2 * a, rel=1e-6)
    pred = cost.evaluate(ParallelConfig(tp=2, dp=4))
    assert pred.predicted.sources["layer times and activation bytes"] == "measured (p.json): measured"
    plain = CostModel(MODEL, CLUSTER, TRAINING, engine=NO_DTENSOR).evaluate(ParallelConfig(tp=2, dp=4))
    assert pred.predicted.step_time_s > 1.2 * plain.predicted.step_time_s
    assert pred.predicted.peak_memory_bytes > plain.predicted.peak_memory_bytes


def test_unmeasured_shapes_are_interpolated_and_recompute_falls_back():
    cost = CostModel(MODEL, CLUSTER, TRAINING, profile(2.0, 1.0), "p.json", engine=NO_DTENSOR)
    tp_group = cost.group(ParallelDims(tp=4, dp=2), "tp")
    blk = cost.block(4, 2, False, "full", tp_group, BF16)
    f, b, _ = analytical(4, 2, "full")
    assert blk.forward.compute == pytest.approx(2.0 * f)                    # every point says x2
    assert blk.backward.compute + blk.recompute.compute == pytest.approx(2.0 * b)
    src = cost.sources_for(ParallelConfig(tp=4, dp=2, mbs=2, recompute="full"))
    assert "interpolated from" in src["layer times and activation bytes"]


def test_profile_of_another_model_sequence_or_device_is_not_used():
    other = PRESETS["llama3.2-3b"]
    cpu = profile(2.0, 1.0)
    cpu = cpu.model_copy(update={"device": cpu.device.model_copy(update={"type": "cpu", "name": "x86"})})
    a100 = profile(2.0, 1.0)
    a100 = a100.model_copy(update={"device": a100.device.model_copy(update={"name": "NVIDIA A100-SXM4-80GB"})})
    for prof in (profile(2.0, 1.0, model=other), profile(2.0, 1.0, seq=4096), cpu, a100):
        cost = CostModel(MODEL, CLUSTER, TRAINING, prof, "p.json")
        pred = cost.evaluate(ParallelConfig(tp=1, dp=8))
        plain = CostModel(MODEL, CLUSTER, TRAINING).evaluate(ParallelConfig(tp=1, dp=8))
        assert pred.predicted.step_time_s == pytest.approx(plain.predicted.step_time_s)
        assert "not used" in pred.predicted.sources["layer times and activation bytes"]


def test_moe_blocks_take_the_factors_of_the_moe_measurements():
    """moe-tiny has one dense layer and three MoE layers: a profile measuring dense blocks at 1x and MoE blocks at
    3x the analytical numbers makes the mean block (1 * dense + 3 * 3 * MoE) / 4, layer by layer."""
    from planner.cost.memory import block_activation_bytes as acts
    model = PRESETS["moe-tiny"]
    training = TrainingSpec(global_batch=8, seq_len=256, precision="bf16")
    opts, (host_f, _) = KernelOptions.of(ENGINE), ENGINE.host_per_kernel
    blocks, want = [], {}
    for layer, scale in (("dense", 1.0), ("moe", 3.0)):
        w = block_work(model, 1, 256, 1, False, "none", BF16, opts, moe_layer=layer == "moe")
        f = pass_time(w.forward, CLUSTER.gpu, "bf16", host_f)                   # in the step
        alone = isolated_time([(w.forward, host_f)], CLUSTER.gpu, "bf16")      # as profiled
        a = acts(model, 1, 256, 1, False, "none", BF16, opts, moe_layer=layer == "moe")
        want[layer] = (f, a)
        blocks.append(BlockMeasurement(layer=layer, tp=1, mbs=1, recompute="none", forward_s=alone * scale,
                                       backward_s=alone * scale, activation_bytes=int(a * scale)))
    prof = ModelProfile(model=model, precision="bf16", seq_len=256,
                        device=DeviceInfo(type="cuda", name=CLUSTER.gpu.name, torch_version="2.13.0"), blocks=blocks)
    cost = CostModel(model, CLUSTER, training, prof, "p.json")
    from planner.parallel_dims import ParallelDims
    tp_group = cost.group(ParallelDims(pp=1, dp=8, tp=1), "tp")
    blk = cost.block(1, 1, False, "none", tp_group, BF16)
    (f_d, a_d), (f_m, a_m) = want["dense"], want["moe"]
    assert blk.forward.compute == pytest.approx((f_d + 3 * 3.0 * f_m) / 4)
    assert blk.activation_bytes == pytest.approx((a_d + 3 * 3.0 * a_m) / 4, rel=1e-6)
    said = cost.sources_for(ParallelConfig(dp=8))["layer times and activation bytes"]
    assert "dense blocks measured" in said and "MoE blocks measured" in said
