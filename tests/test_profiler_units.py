"""Profiler pieces that need no second process: the tournament, the fits, group partitions, the summary of
raw measurements into a ClusterSpec, and the file rules. Checked against synthetic data generated from
known parameters and against the cost model's own formulas."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

from planner.cost.comm import Network, ring_time
from planner.cost.kernels import Kernel, kernel_time, shape_efficiency
from planner.cost.dp_comm import exposed as _exposed
from planner.engine import engine_on, load_engine
from planner.errors import InputError
from planner.specs import ClusterSpec
from profiler.collectives import partition, partitions
from profiler.fit import bus_bandwidth, consistent, fit_alpha_beta, fit_gemm, overlap_slowdown
from profiler.host import fit_per_kernel
from profiler.io import check_output, load_raw, new_raw, partial_path, save_raw
from profiler.links import round_robin
from profiler.summarize import summarize


@pytest.mark.parametrize("n", range(2, 11))
def test_round_robin_meets_every_pair_once_in_n_minus_1_rounds(n):
    rounds = round_robin(n)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    met = [p for r in rounds for p in r]
    assert sorted(met) == sorted(itertools.combinations(range(n), 2))
    for r in rounds:                      # a rank is in at most one pair per round
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks))


def test_alpha_beta_fit_recovers_known_link():
    rng = random.Random(1)
    alpha, beta = 150e-6, 1.7e9
    sizes = [4096, 65536, 524288, 2097152]
    # round trip = message (alpha + M/beta) + a 4-byte acknowledgement (alpha), with 3% noise
    times = [(2 * alpha + m / beta) * (1 + rng.uniform(-0.03, 0.03)) for m in sizes]
    fit = fit_alpha_beta(sizes, times)
    assert fit.latency_s == pytest.approx(alpha, rel=0.1)
    assert fit.bandwidth == pytest.approx(beta, rel=0.1)


def test_alpha_beta_fit_never_returns_nonsense_on_disturbed_times():
    sizes = [4096, 65536, 524288, 2097152]
    times = [5.7e-3, 5.5e-3, 1.1e-3, 1.5e-3]      # small sizes hit by host noise (seen on a loaded VM)
    assert not consistent(sizes, times)
    fit = fit_alpha_beta(sizes, times)
    assert 0 < fit.bandwidth <= sizes[-1] / min(times) and 0 <= fit.latency_s <= max(times)


def test_gemm_fit_recovers_rate_and_tile_of_the_cost_model_curve():
    rate, tile = 3.0e11, 24.0
    shapes = [(n, n, n) for n in (64, 128, 256, 512, 1024)] + [(4096, 64, 512), (512, 512, 32)]
    times = [2 * m * n * k / (rate * shape_efficiency((m, n, k), tile)) for m, n, k in shapes]
    fit = fit_gemm(shapes, times, overhead_s=1e-6)
    assert fit.rate == pytest.approx(rate, rel=0.02)
    assert fit.tile == pytest.approx(tile, rel=0.05)
    assert fit.rms_log_error < 1e-3


@pytest.mark.parametrize("op,n", [("all_reduce", 2), ("all_reduce", 8), ("all_gather", 4), ("reduce_scatter", 8)])
def test_bus_bandwidth_inverts_the_cost_model_ring(op, n):
    """A ring over links of bandwidth B shows bus bandwidth B (nccl-tests' definition), zero latency."""
    m, bw = 64 << 20, 2.5e9
    t = ring_time(op, n, m, 0.0, bw)
    assert bus_bandwidth(op, n, m, t) == pytest.approx(bw)


@pytest.mark.parametrize("compute,comm", [(1.0, 0.4), (0.5, 1.2), (1.0, 1.0)])
@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_overlap_slowdown_inverts_the_cost_model_exposed_time(compute, comm, kappa):
    both = compute + _exposed(comm, compute, kappa)
    assert overlap_slowdown(compute, comm, both) == pytest.approx(kappa)


def test_partitions_cover_all_ranks_contiguous_and_strided():
    assert partitions(8) == [(2, True), (2, False), (4, True), (4, False), (8, True)]
    assert partition(8, 2, True) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition(8, 2, False) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert partition(8, 4, False) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for g, contiguous in partitions(12):
        groups = partition(12, g, contiguous)
        assert sorted(r for grp in groups for r in grp) == list(range(12))
        assert all(len(grp) == g for grp in groups)


# ---------------------------------------------------------------------------------------------- summary
SIZES = [4096, 65536, 524288, 2097152]


def _synthetic_raw(nodes: int, gpn: int, intra=(2e9, 100e-6), inter=(0.5e9, 400e-6)) -> dict:
    """A raw profile of a cluster whose links, GEMMs and collectives follow known parameters."""
    world = nodes * gpn
    raw = new_raw({"world_size": world, "gpus_per_node": gpn, "backend": "gloo", "device_type": "cpu",
                   "p2p_sizes": SIZES, "collective_sizes": [1 << 20], "reps": 5})
    rate, tile = 2e10, 12.0
    shapes = [(n, n, n) for n in (32, 64, 128, 256)] + [(1024, 64, 256), (512, 512, 32)]
    dev = {"host": "node", "type": "cpu", "torch": "x", "threads": 1, "name": "Test CPU (1/2 of 2 cores)",
           "memory_bytes": 8 << 30, "runtime_reserved_bytes": 300 << 20, "main_dtype": "fp32",
           "gemm": [{"dtype": "fp32", "shape": list(s), "time_s": 2 * math.prod(s) / (rate * shape_efficiency(s, tile))}
                    for s in shapes] + [{"dtype": "bf16", "shape": [128, 128, 128], "time_s": 0.004}],
           "memory": {"buffer_bytes": 1 << 25, "copy_bandwidth": 6e9, "elementwise_bandwidth": 4.5e9,
                      "kernel_overhead_s": 5e-6},
           "attention": {"dtype": "fp32", "shape": [1, 4, 256, 32], "time_s": 0.003, "flops": 5.9e7}}
    raw["devices"] = {str(r): dict(dev, host=f"node{r // gpn}") for r in range(world)}
    for i, pairs in enumerate(round_robin(world)):
        part = {}
        for a, b in pairs:
            bw, lat = intra if a // gpn == b // gpn else inter
            part[f"{a}->{b}"] = [2 * lat + m / bw for m in SIZES]
            part[f"{b}->{a}"] = [2 * lat + m / (bw * 1.05) for m in SIZES]
        raw["links"][str(i)] = part
    for g, contiguous in partitions(world):
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            raw["collectives"].append({"op": op, "group_size": g, "contiguous": contiguous,
                                       "message_bytes": 1 << 20, "time_s": ring_time(op, g, 1 << 20, 1e-4, 1e9)})
    raw["overlap"] = [{"compute_s": 1.0, "comm_s": 0.5, "both_s": 1.0 + _exposed(0.5, 1.0, 0.25)}] * world
    return raw


def test_summary_is_a_cluster_spec_with_the_generating_parameters():
    spec, details = summarize(_synthetic_raw(1, 4), name="synthetic")
    ClusterSpec.model_validate(spec.model_dump())            # round-trips through the schema
    assert spec.measured and spec.backend == "gloo" and spec.world_size == 4
    gpu = spec.gpu
    assert gpu.peak_flops["fp32"] * gpu.efficiency.gemm_max == pytest.approx(2e10, rel=0.02)
    assert gpu.efficiency.gemm_tile == pytest.approx(12.0, rel=0.05)
    assert gpu.hbm_bandwidth == pytest.approx(6e9) and gpu.efficiency.memory == pytest.approx(0.75)
    lm = spec.link_matrix
    for i, j in itertools.permutations(range(4), 2):
        expect = 2e9 if i < j else 2e9 * 1.05                # the b->a direction was made 5% faster
        assert lm.bandwidth[i][j] == pytest.approx(expect, rel=1e-6)
        assert lm.latency[i][j] == pytest.approx(100e-6, rel=1e-6)
    assert all(lm.bandwidth[i][i] == 0 and lm.latency[i][i] == 0 for i in range(4))
    assert spec.overlap_slowdown == pytest.approx(0.25)
    assert "single node" in spec.description and spec.inter_node == spec.intra_node
    ar4 = [c for c in spec.collectives if c.op == "all_reduce" and c.group_size == 4]
    assert ar4 and ar4[0].bus_bandwidth == pytest.approx(bus_bandwidth("all_reduce", 4, 1 << 20, ar4[0].time_s))


def test_summary_fits_attention_rate_and_head_dimension_from_two_widths():
    raw = _synthetic_raw(1, 2)
    rate, d0 = 4e9, 24.0          # FLOP/s at wide heads, and the head dimension of half that rate
    for r in range(2):
        for key, d in (("attention", 64), ("attention_narrow", 16)):
            flops = 0.5 * 4 * 256 * 256 * 4 * d * 3.5
            raw["devices"][str(r)][key] = {"dtype": "fp32", "shape": [1, 4, 256, d], "flops": flops,
                                           "time_s": flops / (rate * d / (d + d0))}
    eff = summarize(raw)[0].gpu
    assert eff.efficiency.attention_head_dim == pytest.approx(d0, rel=1e-9)
    assert eff.peak_flops["fp32"] * eff.efficiency.flash_attention == pytest.approx(rate, rel=1e-9)
    # the cost model charges a fused attention of either width the seconds measured for it
    for key in ("attention", "attention_narrow"):
        m = raw["devices"]["0"][key]
        kernel = Kernel("attn", m["flops"], 0.0, (4 * 256 / 128, m["shape"][3], 1.0))
        assert kernel_time(kernel, eff, "fp32") == pytest.approx(m["time_s"], rel=1e-9)
    # a raw profile with one width (before this measurement) leaves the head dimension out
    assert summarize(_synthetic_raw(1, 2))[0].gpu.efficiency.attention_head_dim == 0.0


def test_summary_puts_the_measured_host_cost_per_kernel_into_the_eager_engines():
    raw = _synthetic_raw(1, 4)
    assert summarize(raw)[0].engine_overrides == {}        # a raw profile from before the host was measured
    for r, per in zip(range(4), (10e-6, 12e-6, 30e-6, 11e-6)):
        raw["devices"][str(r)]["host_issue"] = {"per_kernel_s": per, "per_backward_kernel_s": per / 2, "blocks": {}}
    assert set(summarize(raw)[0].engine_overrides["meshplan"]) == {"host.per_kernel_s", "host.per_backward_kernel_s"}
    for r, per in zip(range(4), (20e-6, 24e-6, 60e-6, 22e-6)):      # and the optimizer's, per parameter tensor
        raw["devices"][str(r)]["host_issue"].update(optimizer_per_tensor_s=per, optimizer_per_dtensor_s=6 * per)
    spec, _ = summarize(raw)
    expect = {"host.per_kernel_s": 11.5e-6, "host.per_backward_kernel_s": 5.75e-6,   # medians over the ranks
              "host.optimizer_per_tensor_s": 23e-6, "host.optimizer_per_dtensor_s": 138e-6}
    assert set(spec.engine_overrides) == {"meshplan", "torchtitan"}
    for engine in ("meshplan", "torchtitan"):
        assert spec.engine_overrides[engine] == pytest.approx(expect)
        host = engine_on(load_engine(engine), spec).host
        assert (host.per_kernel_s, host.per_backward_kernel_s) == pytest.approx((11.5e-6, 5.75e-6))
        assert (host.optimizer_per_tensor_s, host.optimizer_per_dtensor_s) == pytest.approx((23e-6, 138e-6))
    assert "megatron" not in spec.engine_overrides       # fused engines keep their own figures


def test_host_cost_per_kernel_is_the_least_squares_slope_less_the_op_time():
    rows = [(180e-6, 12), (405e-6, 34), (60e-6, 5)]
    slope = np.linalg.lstsq(np.array([[n] for _, n in rows], float), np.array([t for t, _ in rows]), rcond=None)[0][0]
    assert fit_per_kernel(rows, 1e-6) == pytest.approx(slope - 1e-6, rel=1e-12)
    assert fit_per_kernel(rows, 1.0) == 0.0                # never negative


def test_summary_separates_intra_and_inter_node_links():
    spec, _ = summarize(_synthetic_raw(2, 2))
    assert spec.num_nodes == 2 and spec.gpus_per_node == 2
    assert spec.intra_node.bandwidth == pytest.approx(2e9, rel=0.06)
    assert spec.inter_node.bandwidth == pytest.approx(0.5e9, rel=0.06)
    assert spec.inter_node.latency == pytest.approx(400e-6, rel=1e-6)
    # the cost model prices a cross-node transfer on the measured pair, not on a spec sheet
    net = Network(spec)
    assert net.p2p(1 << 20, 0, 2) == pytest.approx(400e-6 + (1 << 20) / 0.5e9, rel=1e-6)


def test_summary_refuses_an_incomplete_link_matrix():
    raw = _synthetic_raw(1, 4)
    raw["links"].pop("0")
    with pytest.raises(ValueError, match="missing"):
        summarize(raw)


# ---------------------------------------------------------------------------------------------- files
def test_outputs_are_not_overwritten_without_force(tmp_path):
    out = tmp_path / "c.json"
    out.write_text("{}")
    with pytest.raises(InputError, match="--force"):
        check_output(out, force=False)
    check_output(out, force=True)
    with pytest.raises(InputError, match="must end in"):
        check_output(tmp_path / "c.txt", force=False)
    with pytest.raises(InputError, match="does not exist"):
        check_output(tmp_path / "nope" / "c.json", force=False)


def test_partial_results_resume_only_with_the_same_settings(tmp_path):
    cfg = {"world_size": 4, "p2p_sizes": SIZES}
    path = partial_path(tmp_path / "c.json")
    raw = new_raw(cfg)
    raw["done"] = ["devices"]
    save_raw(path, raw)
    again, resumed = load_raw(path, cfg, restart=False)
    assert resumed and again["done"] == ["devices"]
    with pytest.raises(InputError, match="other settings \\(world_size\\)"):
        load_raw(path, dict(cfg, world_size=8), restart=False)
    fresh, resumed = load_raw(path, dict(cfg, world_size=8), restart=True)
    assert not resumed and fresh["done"] == []
    path.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(InputError, match="not a partial cluster profile"):
        load_raw(path, cfg, restart=False)


def test_the_cli_modules_import_no_torch():
    """`meshplan estimate` must stay fast: loading the CLI (which registers `profile`) imports no torch."""
    import subprocess
    import sys
    code = "import sys, planner.cli, profiler.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
