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
