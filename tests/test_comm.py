"""Collective costs: nccl-tests' bus-bandwidth convention, hierarchy across nodes, measured tables."""

from __future__ import annotations

import pytest

from planner.cost.comm import Group, Network, _fit_affine, ring_time
from planner.loaders import load_cluster
from planner.specs import CollectiveMeasurement


@pytest.mark.parametrize("op,factor", [("all_reduce", lambda n: 2 * (n - 1) / n),
                                       ("all_gather", lambda n: (n - 1) / n), ("reduce_scatter", lambda n: (n - 1) / n)])
@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_ring_bus_bandwidth_equals_link_bandwidth(op, factor, n):
    """nccl-tests PERFORMANCE.md: busbw = algbw * 2(n-1)/n (all-reduce), (n-1)/n (all-gather, reduce-scatter);
    a latency-free ring runs at bus bandwidth = link bandwidth."""
    size, link = 2 ** 30, 100e9
    t = ring_time(op, n, size, 0.0, link)
    assert size / t * factor(n) == pytest.approx(link)


def test_hierarchical_all_reduce_across_nodes():
    """Reduce-scatter in the node, all-reduce of 1/g across nodes on the GPU's NIC share, all-gather in the node."""
    c = load_cluster("dgx-h100", nodes=4)
    net = Network(c)
    group = Group.of(tuple(range(32)), 8)          # 4 nodes x 8 GPUs
    size = 1e9
    intra_bw = c.intra_node.bandwidth * c.intra_node.efficiency
    nic = c.inter_node.bandwidth * c.inter_node.efficiency * c.nics_per_node / 8
    expected = (2 * ring_time("reduce_scatter", 8, size, c.intra_node.latency, intra_bw)
                + ring_time("all_reduce", 4, size / 8, c.inter_node.latency, nic))
    assert net.collective("all_reduce", size, group) == pytest.approx(expected)
    # a strided group with one GPU per node crosses the NICs for everything
    strided = Group.of((0, 8, 16, 24), 8)
    assert net.collective("all_reduce", size, strided) == pytest.approx(
        ring_time("all_reduce", 4, size, c.inter_node.latency, nic))


def test_measured_collective_table_takes_precedence():
    rows = [CollectiveMeasurement(op="all_reduce", group_size=4, contiguous=True, message_bytes=m, time_s=t,
                                  bus_bandwidth=m / t * 1.5) for m, t in ((1 << 20, 2e-3), (4 << 20, 5e-3))]
    c = load_cluster("dgx-h100").model_copy(update={"collectives": rows})
    net = Network(c)
    four = Group.of((0, 1, 2, 3), 8)
    assert net.collective("all_reduce", 1 << 20, four) == pytest.approx(2e-3)
    assert net.collective("all_reduce", 4 << 20, four) == pytest.approx(5e-3)
    assert net.collective("all_reduce", 2 << 20, four) == pytest.approx(3e-3)     # on the fitted line
    eight = Group.of(tuple(range(8)), 8)                                          # scaled by the ring steps
    a, b = 1e-3, 1e-3 / (1 << 20)
    expected = a * 7 / 3 + (4 << 20) * b * (7 / 8) / (3 / 4)
    assert net.collective("all_reduce", 4 << 20, eight) == pytest.approx(expected)


def test_ring_across_nodes_pays_each_hops_latency_and_the_rails_it_uses():
    """An all-gather over 4 nodes x 8 GPUs: NCCL's ring model (src/graph/tuning.cc, ncclTopoTuneModel) charges
    n - N NVLink hops and N - 1 network hops; with every rail the data moves at the node's 8 NICs (capped by
    NVLink), confined to one rail at one NIC's collective bandwidth (hand count)."""
    c = load_cluster("dgx-a100-80gb", nodes=4)
    net = Network(c)
    group = Group.of(tuple(range(32)), 8)
    size = 1e9
    hops = 28 * c.intra_node.latency + 3 * c.inter_node.latency
    nic = c.inter_node.bandwidth * c.inter_node.efficiency                  # 22.5 GB/s: HDR at 0.9
    every = min(c.intra_node.bandwidth * c.intra_node.efficiency, 8 * nic)  # 180 GB/s: 8 rails
    for op in ("all_gather", "reduce_scatter"):
        assert net.collective(op, size, group) == pytest.approx(hops + 31 / 32 * size / every)
        assert net.collective(op, size, group, rails=1) == pytest.approx(hops + 31 / 32 * size / nic)
        assert net.collective(op, size, group, rails=2) == pytest.approx(hops + 31 / 32 * size / (2 * nic))


def test_measured_collectives_fit_latency_and_bandwidth_on_relative_error():
    """nccl-tests-like sizes over five orders of magnitude: exact points give the generating alpha and beta back;
    with +-10% noise the small message, all latency, is still priced within the noise (a fit of absolute error
    hands the latency to the largest message's residual)."""
    alpha, beta = 30e-6, 1 / 200e9
    sizes = [1 << 16, 1 << 20, 1 << 24, 1 << 28, 1 << 30]
    a, b = _fit_affine([(m, alpha + m * beta) for m in sizes])
    assert (a, b) == pytest.approx((alpha, beta), rel=1e-9)
    noisy = [(m, (alpha + m * beta) * f) for m, f in zip(sizes, (1.1, 0.9, 1.1, 0.9, 1.1))]
    a, b = _fit_affine(noisy)
    small = sizes[0]
    assert a + small * b == pytest.approx(alpha + small * beta, rel=0.12)
    assert b == pytest.approx(beta, rel=0.12)
