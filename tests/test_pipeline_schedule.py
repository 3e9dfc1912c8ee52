"""Closed-form pipeline step times against a discrete-event simulation of the same schedules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cost.pipeline import pipeline_time
from tests.pipeline_sim import simulate


def closed(schedule, m, fwd, bwd, p2p=0.0):
    v = len(fwd[0])
    return pipeline_time(schedule, m, [sum(r) for r in fwd], [sum(r) for r in bwd], p2p, v)[0]


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("p,mult", [(2, 1), (4, 2), (8, 4), (3, 3)])
def test_balanced_stages_match_simulation_exactly(schedule, v, p, mult):
    """Balanced stages: (m + p - 1)(tf + tb), interleaved (m + (p-1)/v)(tf + tb) (SC21 Sec. 2.2)."""
    m = p * mult
    fwd = [[1.0 / v] * v for _ in range(p)]
    bwd = [[2.0 / v] * v for _ in range(p)]
    assert closed(schedule, m, fwd, bwd) == pytest.approx(simulate(schedule, m, fwd, bwd, 0.0), rel=1e-12)


@given(p=st.integers(2, 6), m=st.integers(1, 24), seed=st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_gpipe_is_exact_for_any_stage_times(p, m, seed):
    """GPipe's forward and backward phases are flow shops of identical jobs: sum + (m-1) * max is exact."""
    fwd = [[seed.uniform(0.2, 2.0)] for _ in range(p)]
    bwd = [[seed.uniform(0.4, 4.0)] for _ in range(p)]
    assert closed("gpipe", m, fwd, bwd) == pytest.approx(simulate("gpipe", m, fwd, bwd, 0.0), rel=1e-12)


@given(p=st.integers(2, 8), mult=st.integers(4, 12), v=st.integers(1, 3), seed=st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_unbalanced_1f1b_and_interleaved_within_8_percent(p, mult, v, seed):
    """Stages within +-30% of each other (what the layer split leaves) and m >= 4p: the closed form's
    critical path stays within 8% of the simulated schedule and never below the busiest device's work."""
    schedule = "interleaved" if v > 1 else "1f1b"
    m = p * mult
    fwd = [[seed.uniform(0.7, 1.3) for _ in range(v)] for _ in range(p)]
    bwd = [[2 * f * seed.uniform(0.8, 1.2) for f in row] for row in fwd]
    sim = simulate(schedule, m, fwd, bwd, 0.0)
    got = closed(schedule, m, fwd, bwd)
    assert got == pytest.approx(sim, rel=0.08)
    assert got >= m * max(sum(f) + sum(b) for f, b in zip(fwd, bwd)) - 1e-9

