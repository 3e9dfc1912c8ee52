"""Stages to node groups and layers to stages: the ILP (pulp + CBC) against brute-force enumeration of every
assignment and every layer split on small instances, and the local search never worse than its start."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from planner.hetero.assign import StageProblem, brute_force, contiguous, local_search, solve_ilp


@st.composite
def problems(draw):
    stages = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    layers = draw(st.integers(stages, 8))
    block = [draw(st.floats(0.2, 3.0)) for _ in range(groups)]
    extra = [[draw(st.floats(0.0, 2.0)) for _ in range(groups)] for _ in range(stages)]
    caps = [[draw(st.integers(0, 6)) for _ in range(groups)] for _ in range(stages)]
    hop = [[draw(st.floats(0.0, 1.0)) for _ in range(groups)] for _ in range(groups)]
    capacity = [draw(st.integers(0, stages)) for _ in range(groups)]
    return StageProblem(layers, draw(st.integers(1, 12)), block, extra, caps, hop, capacity)


@given(problem=problems())
@settings(max_examples=60, deadline=None)
def test_ilp_equals_brute_force(problem):
    expected = brute_force(problem)
    found = solve_ilp(problem)
    if expected is None:
        assert found is None
        return
    assert found is not None and found.method == "ilp"
    assert problem.fits(found.groups) and sum(found.layers) == problem.layers
    assert all(1 <= n <= problem.caps[s][k] for s, (k, n) in enumerate(zip(found.groups, found.layers)))
    assert math.isclose(found.objective, expected.objective, rel_tol=1e-7, abs_tol=1e-9)


@given(problem=problems())
@settings(max_examples=100, deadline=None)
def test_local_search_is_feasible_and_no_worse_than_contiguous(problem):
    start = contiguous(problem)
    found = local_search(problem, start)
    expected = brute_force(problem)
    if start is None:
        assert found is None
        return
    assert found.objective <= start.objective
    assert found.objective >= expected.objective * (1 - 1e-12)
    assert problem.fits(found.groups) and sum(found.layers) == problem.layers


def test_a_slow_link_is_crossed_once():
    # two equal groups of 2 stages joined by a slow link (10 s per transfer), fast inside (0.1 s): any
    # interleaving crosses it more than once, the optimum keeps each group's stages together (and gives the two
    # stages beside the slow hop one block each)
    slow, fast = 10.0, 0.1
    problem = StageProblem(layers=8, microbatches=8, block=[1.0, 1.0], extra=[[0.0, 0.0]] * 4,
                           caps=[[8, 8]] * 4, hop=[[fast, slow], [slow, fast]], capacity=[2, 2])
    found = solve_ilp(problem)
    crossings = sum(a != b for a, b in zip(found.groups, found.groups[1:]))
    assert crossings == 1 and found.layers[1:3] == [1, 1]
    assert found.objective == brute_force(problem).objective


def test_fast_gpus_take_more_layers_and_memory_heavy_positions_go_to_big_memory():
    # group 0 is 3x faster; position 0 (most micro-batches in flight) holds at most 1 block on group 0
    problem = StageProblem(layers=10, microbatches=16, block=[1.0, 3.0], extra=[[0.0, 0.0]] * 3,
                           caps=[[1, 10], [10, 10], [10, 10]], hop=[[0.0, 0.0], [0.0, 0.0]], capacity=[2, 1])
    found = solve_ilp(problem)
    assert found.groups[0] == 1 and found.groups[1:] == (0, 0)
    assert found.objective == brute_force(problem).objective


@given(layers=st.integers(1, 9), m=st.integers(1, 10),
       groups=st.lists(st.tuples(st.floats(0.2, 3.0), st.integers(1, 2)), min_size=1, max_size=3))
@settings(max_examples=100, deadline=None)
def test_the_search_bound_is_below_every_split(layers, m, groups):
    """The search's filling bound (planner.hetero.search._fill_bound) never exceeds (m - 1) max + sum of the
    stage times of any integer split of the layers over the stages, found by enumeration."""
    from itertools import product

    from planner.hetero.search import _fill_bound
    blocks = [b for b, count in groups for _ in range(count)]
    if len(blocks) > layers:
        return
    best = min((m - 1) * max(n * b for n, b in zip(split, blocks)) + sum(n * b for n, b in zip(split, blocks))
               for split in product(range(1, layers + 1), repeat=len(blocks)) if sum(split) == layers)
    assert _fill_bound(layers, m, groups) <= best * (1 + 1e-12)
