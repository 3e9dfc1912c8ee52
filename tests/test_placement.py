"""Placement on measured links: never worse than rank r on device r, and as good as brute force on a small case."""

from __future__ import annotations

from itertools import permutations

import pytest

from planner.cost.model import CostModel
from planner.layout import DEFAULT_ORDER
from planner.loaders import load_cluster
from planner.search.placement import improve_placement
from planner.search.search import search
from planner.search.space import Candidate, Constraints
from planner.specs import LinkMatrix, ModelSpec, TrainingSpec

MODEL = ModelSpec(num_layers=8, hidden_size=2048, num_heads=16, vocab_size=32000, max_position_embeddings=2048)
TRAINING = TrainingSpec(global_batch=32, seq_len=2048)


def measured_cluster(slow_pairs: set[frozenset[int]], n: int = 4):
    """One node of n GPUs whose links are 100 GB/s, except `slow_pairs` at 1 GB/s."""
    bw = [[0.0 if i == j else (1e9 if frozenset((i, j)) in slow_pairs else 100e9) for j in range(n)] for i in range(n)]
    lat = [[0.0 if i == j else 5e-6 for j in range(n)] for i in range(n)]
    base = load_cluster("dgx-a100-80gb", nodes=1, gpus_per_node=n)
    return base.model_copy(update={"link_matrix": LinkMatrix(world_size=n, bandwidth=bw, latency=lat),
                                   "measured": True})


def test_placement_avoids_slow_links_like_brute_force():
    cluster = measured_cluster({frozenset((0, 1)), frozenset((2, 3))})
    cost = CostModel(MODEL, cluster, TRAINING)
    cand = Candidate(1, 4, 1, 1, 1, 0, "none", False, "1f1b", DEFAULT_ORDER)
    naive = cost.evaluate_core(cand, cand.order)
    placed = improve_placement(cost, cand, naive)
    brute = min(cost.evaluate_core(cand, cand.order, perm).step for perm in permutations(range(4)))
    assert placed.step == pytest.approx(brute, rel=1e-9)
    assert placed.step < 0.9 * naive.step            # the naive pipeline 0-1-2-3 crosses both slow links
    path = placed.devices
    assert all(frozenset((path[i], path[i + 1])) not in ({frozenset((0, 1)), frozenset((2, 3))})
               for i in range(3))


def test_search_reports_placement_and_never_loses():
    cluster = measured_cluster({frozenset((1, 2))})
    result = search(MODEL, cluster, TRAINING, Constraints(), top_k=3)
    assert result.top and result.naive_step is not None
    assert result.top[0].step <= result.naive_step * (1 + 1e-12)


def test_plan_file_carries_the_placement(tmp_path):
    from planner.plan import make_plan
    cluster = measured_cluster({frozenset((0, 1)), frozenset((2, 3))})
    cost = CostModel(MODEL, cluster, TRAINING)
    cand = Candidate(1, 4, 1, 1, 1, 0, "none", False, "1f1b", DEFAULT_ORDER)
    placed = improve_placement(cost, cand, cost.evaluate_core(cand, cand.order))
    plan = make_plan(MODEL, cluster, TRAINING, cost.prediction(placed))
    assert plan.config.placement == list(placed.devices)
    assert [e.local_gpu for e in sorted(plan.rank_layout, key=lambda e: e.rank)] == list(placed.devices)


def _runnable(dims, devices) -> bool:
    """Every TP and DP group on increasing devices (what `meshplan run`'s DeviceMesh can run)."""
    return all(list(devices[r] for r in g) == sorted(devices[r] for r in g)
               for dim in ("tp", "dp") for g in dims.groups(dim))


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (1, 2, 2)])
@pytest.mark.parametrize("slow", [{(0, 1)}, {(1, 2)}, {(0, 2), (1, 3)}, {(0, 3), (1, 2)}])
def test_placement_keeps_groups_in_process_order_and_is_the_best_such(tp, pp, dp, slow):
    """Against brute force over every placement the runtime can run: the search never returns a TP or DP group
    on decreasing devices (DeviceMesh numbers a sub-group by process), and it finds the fastest of those."""
    from planner.parallel_dims import ParallelDims
    cluster = measured_cluster({frozenset(p) for p in slow})
    cost = CostModel(MODEL, cluster, TRAINING)
    cand = Candidate(tp, pp, dp, 1, 1, 0, "none", False, "1f1b", DEFAULT_ORDER)
    dims = ParallelDims.of(cand, cand.order)
    placed = improve_placement(cost, cand, cost.evaluate_core(cand, cand.order))
    assert placed.devices is None or _runnable(dims, placed.devices)
    brute = min(cost.evaluate_core(cand, cand.order, perm).step for perm in permutations(range(4))
                if _runnable(dims, perm))
    assert placed.step == pytest.approx(brute, rel=1e-9)
