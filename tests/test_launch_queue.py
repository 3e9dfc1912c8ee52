"""A pass timed alone (kernels.isolated_pass_time): one in-order stream fed by the host from an idle device, checked
against a hand-worked launch timeline."""

from __future__ import annotations

import pytest

from planner.cost.kernels import Kernel, Pass, isolated_pass_time, pass_time
from planner.loaders import load_cluster


def memory_kernel(seconds: float, gpu) -> Kernel:
    """An elementwise kernel that takes `seconds` on `gpu` (bytes over its achievable HBM bandwidth)."""
    return Kernel("mem", bytes=seconds * gpu.hbm_bandwidth * gpu.efficiency.memory)


def test_isolated_pass_follows_the_launch_timeline():
    """Host 10 us per launch; device 50, 2, 2, 30 us. Launches at 10, 20, 30, 40 us; the first kernel runs 10-60,
    the second and third 60-62 and 62-64 (queued behind it), the fourth 64-94: 94 us. The steady state of many
    such passes is max(40, 84) = 84 us, a host-bound order (2, 2, 2, 2 at 10 us each) ends at 42 us against
    the steady state's 40."""
    gpu = load_cluster("hgx-h200").gpu
    gpu = gpu.model_copy(update={"efficiency": gpu.efficiency.model_copy(update={"kernel_overhead_s": 1e-6})})
    p = Pass([memory_kernel(t * 1e-6, gpu) for t in (50, 2, 2, 30)])
    assert isolated_pass_time(p, gpu, "bf16", 10e-6) == pytest.approx(94e-6)
    assert pass_time(p, gpu, "bf16", 10e-6) == pytest.approx(84e-6)
    small = Pass([memory_kernel(2e-6, gpu) for _ in range(4)])
    assert isolated_pass_time(small, gpu, "bf16", 10e-6) == pytest.approx(42e-6)
    assert pass_time(small, gpu, "bf16", 10e-6) == pytest.approx(40e-6)


def test_isolated_pass_on_a_synchronous_device_is_the_sum():
    cpu = load_cluster("cpu-local").gpu
    p = Pass([memory_kernel(5e-6, cpu) for _ in range(3)])
    device = sum(max(5e-6, cpu.efficiency.kernel_overhead_s) for _ in range(3))
    assert isolated_pass_time(p, cpu, "fp32", 1e-6) == pytest.approx(device + 3e-6)


def _llama_1b(mbs: int, speed: float = 1.0):
    """Llama-3.2-1B at ZeRO-3 on 8 H100s, `mbs` sequences of 2,048 tokens per micro-batch, on GPUs `speed` times
    as fast (peak FLOP/s and HBM bandwidth scaled)."""
    from planner.cost.model import CostModel
    from planner.presets import PRESETS
    from planner.specs import ParallelConfig, TrainingSpec
    cluster = load_cluster("dgx-h100").resized(1, 8)
    gpu = cluster.gpu
    gpu = gpu.model_copy(update={"peak_flops": {k: v * speed for k, v in gpu.peak_flops.items()},
                                 "hbm_bandwidth": gpu.hbm_bandwidth * speed})
    cluster = cluster.model_copy(update={"gpu_types": {cluster.nodes.gpu_type: gpu}})
    cost = CostModel(PRESETS["llama3.2-1b"], cluster, TrainingSpec(global_batch=8 * mbs, seq_len=2048))
    return cost.evaluate(ParallelConfig(tp=1, pp=1, dp=8, mbs=mbs, zero=3)).predicted


def test_binding_names_host_launch_bound_blocks():
    """The report says "host-launch-bound" exactly where the blocks' step time does not follow the GPU: at one
    sequence per micro-batch, GPUs twice as fast leave the step within 15% (the host issues the kernels); at
    eight, the step shrinks by more than a third and the binding says compute-bound."""
    small, small_fast = _llama_1b(1), _llama_1b(1, speed=2.0)
    big, big_fast = _llama_1b(8), _llama_1b(8, speed=2.0)
    assert small_fast.step_time_s > 0.85 * small.step_time_s
    assert small.binding.startswith("host-launch-bound")
    assert big_fast.step_time_s < 0.67 * big.step_time_s
    assert big.binding.startswith("compute-bound")
