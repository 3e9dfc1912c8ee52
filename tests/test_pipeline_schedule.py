"""Closed-form pipeline step times (planner/cost/pipeline.py) against the discrete-event simulation of the
same schedules (planner/cost/schedule.py), and the simulation's own invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cost.pipeline import pipeline_time
from planner.cost.schedule import simulate


def closed(schedule, m, fwd, bwd, p2p=0.0, blocking=False):
    v = len(fwd[0])
    return pipeline_time(schedule, m, [sum(r) for r in fwd], [sum(r) for r in bwd], p2p, v, blocking)[0]


def makespan(schedule, m, fwd, bwd, p2p=0.0):
    return simulate(schedule, m, fwd, bwd, p2p).makespan


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("p,mult", [(2, 1), (4, 2), (8, 4), (3, 3)])
def test_balanced_stages_match_simulation_exactly(schedule, v, p, mult):
    """Balanced stages: (m + p - 1)(tf + tb), interleaved (m + (p-1)/v)(tf + tb) (SC21 Sec. 2.2)."""
    m = p * mult
    fwd = [[1.0 / v] * v for _ in range(p)]
    bwd = [[2.0 / v] * v for _ in range(p)]
    assert closed(schedule, m, fwd, bwd) == pytest.approx(makespan(schedule, m, fwd, bwd), rel=1e-12)
    want = (m + (p - 1) / v) * 3.0 if schedule == "interleaved" else (m + p - 1) * 3.0
    assert makespan(schedule, m, fwd, bwd) == pytest.approx(want, rel=1e-12)


@given(p=st.integers(2, 6), m=st.integers(1, 24), seed=st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_gpipe_is_exact_for_any_stage_times(p, m, seed):
    """GPipe's forward and backward phases are flow shops of identical jobs: sum + (m-1) * max is exact."""
    fwd = [[seed.uniform(0.2, 2.0)] for _ in range(p)]
    bwd = [[seed.uniform(0.4, 4.0)] for _ in range(p)]
    assert closed("gpipe", m, fwd, bwd) == pytest.approx(makespan("gpipe", m, fwd, bwd), rel=1e-12)


@given(p=st.integers(2, 6), m=st.integers(1, 24), c=st.floats(0.0, 1.0), seed=st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_gpipe_with_link_delays_is_exact(p, m, c, seed):
    """With transfers as link delays, each phase's longest path is sum F + (p-1) c + (m-1) max F, which is the
    asynchronous closed form for any stage times."""
    fwd = [[seed.uniform(0.2, 2.0)] for _ in range(p)]
    bwd = [[seed.uniform(0.4, 4.0)] for _ in range(p)]
    got = makespan("gpipe", m, fwd, bwd, c)
    assert got == pytest.approx(closed("gpipe", m, fwd, bwd, c), rel=1e-12, abs=1e-12)
    longest = sum(f[0] + b[0] for f, b in zip(fwd, bwd)) + 2 * (p - 1) * c + (m - 1) * (
        max(f[0] for f in fwd) + max(b[0] for b in bwd))
    assert got == pytest.approx(longest, rel=1e-12)


@given(p=st.integers(2, 8), mult=st.integers(1, 8), v=st.integers(1, 4), tf=st.floats(0.2, 2.0),
       ratio=st.floats(1.0, 3.0), share=st.floats(0.0, 1.0))
@settings(max_examples=120, deadline=None)
def test_balanced_1f1b_and_interleaved_with_link_delays_are_exact(p, mult, v, tf, ratio, share):
    """Balanced stages with transfers up to one chunk's forward time: the asynchronous closed forms equal the
    simulation (1F1B's round trip between neighbours each cycle, interleaving's fill and drain only)."""
    schedule = "interleaved" if v > 1 else "1f1b"
    m = p * mult
    fwd = [[tf / v] * v for _ in range(p)]
    bwd = [[tf * ratio / v] * v for _ in range(p)]
    c = share * tf / v
    assert closed(schedule, m, fwd, bwd, c) == pytest.approx(makespan(schedule, m, fwd, bwd, c), rel=1e-9)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_blocking_transfers_are_device_time(schedule, v):
    """Blocking send/recv (Megatron's, DeepSpeed's): every transfer keeps both stages busy, so the closed form
    is the simulation without delays of devices whose every chunk pass is c longer."""
    p, m, c = 4, 8, 0.3
    fwd = [[1.0 / v] * v for _ in range(p)]
    bwd = [[2.0 / v] * v for _ in range(p)]
    busy_f = [[x + c for x in row] for row in fwd]
    busy_b = [[x + c for x in row] for row in bwd]
    assert closed(schedule, m, fwd, bwd, c, blocking=True) == pytest.approx(
        makespan(schedule, m, busy_f, busy_b), rel=1e-12)
    assert closed(schedule, m, fwd, bwd, c, blocking=True) > closed(schedule, m, fwd, bwd, c)


@given(p=st.integers(2, 8), mult=st.integers(4, 12), v=st.integers(1, 3), seed=st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_unbalanced_1f1b_and_interleaved_within_8_percent(p, mult, v, seed):
    """Stages within +-30% of each other (what the layer split leaves) and m >= 4p: the closed form's
    critical path stays within 8% of the simulated schedule and never below the busiest device's work."""
    schedule = "interleaved" if v > 1 else "1f1b"
    m = p * mult
    fwd = [[seed.uniform(0.7, 1.3) for _ in range(v)] for _ in range(p)]
    bwd = [[2 * f * seed.uniform(0.8, 1.2) for f in row] for row in fwd]
    sim = makespan(schedule, m, fwd, bwd)
    got = closed(schedule, m, fwd, bwd)
    assert got == pytest.approx(sim, rel=0.08)
    assert got >= m * max(sum(f) + sum(b) for f, b in zip(fwd, bwd)) - 1e-9


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_operations_keep_devices_serial_and_dependencies_in_order(schedule, v):
    """Every device runs every (op, chunk, micro-batch) once with its pieces back to back and never two at a
    time; a forward starts after the previous virtual stage's forward has arrived, a backward after the next
    virtual stage's backward has."""
    p, m, c = 4, 8, 0.25
    fwd = [[[("forward", 1.0 + i / 10), ("communication", 0.1)] for _ in range(v)] for i in range(p)]
    bwd = [[[("recompute", 0.5), ("backward", 2.0 - i / 10)] for _ in range(v)] for i in range(p)]
    tl = simulate(schedule, m, fwd, bwd, c)
    for i in range(p):
        mine = tl.rows[i]
        assert all(o.device == i for o in mine)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))
        assert tl.busy(i) == pytest.approx({"forward": m * v * (1.0 + i / 10), "communication": m * v * 0.1,
                                            "recompute": m * v * 0.5, "backward": m * v * (2.0 - i / 10)})
        for o in mine:
            parts = list(o.parts())
            assert [k for k, _, _ in parts] == (["forward", "communication"] if o.op == "F"
                                                 else ["recompute", "backward"])
            assert parts[0][1] == o.start and parts[-1][2] == pytest.approx(o.end)
    span = {(o.op, o.chunk * p + o.device, o.microbatch): (o.start, o.end) for o in tl.ops}
    assert len(span) == 2 * m * p * v
    last = p * v - 1
    for (op, g, j), (start, _) in span.items():
        if op == "F" and g > 0:
            assert start >= span[("F", g - 1, j)][1] + c - 1e-12
        if op == "B":
            before = span[("B", g + 1, j)][1] + c if g < last else span[("F", g, j)][1]
            assert start >= before - 1e-12
    assert len(tl.transfers) == 2 * m * (p * v - 1)
    assert all(t.end - t.start == pytest.approx(c) for t in tl.transfers)
    assert tl.makespan == max(o.end for o in tl.ops)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
@pytest.mark.parametrize("blocking", [False, True])
def test_one_delay_per_link_alike_is_one_delay(schedule, v, blocking):
    """Per-link delays that are all equal price exactly as the one delay they repeat (closed form and simulation)."""
    p, m, c = 4, 8, 0.3
    fwd = [[(1.0 + i / 7) / v] * v for i in range(p)]
    bwd = [[(2.0 - i / 9) / v] * v for i in range(p)]
    assert closed(schedule, m, fwd, bwd, [c] * (p - 1), blocking) == closed(schedule, m, fwd, bwd, c, blocking)
    assert makespan(schedule, m, fwd, bwd, [c] * (p - 1)) == makespan(schedule, m, fwd, bwd, c)


def test_simulated_transfers_take_their_own_link_delay():
    """Each activation and gradient takes the delay of the link it crosses, in both directions."""
    p, m, links = 4, 8, [0.05, 0.4, 0.1]
    tl = simulate("1f1b", m, [[1.0]] * p, [[2.0]] * p, links)
    assert len(tl.transfers) == 2 * m * (p - 1)
    for t in tl.transfers:
        assert t.end - t.start == pytest.approx(links[min(t.src, t.dst)])
        assert abs(t.src - t.dst) == 1


def test_blocking_transfers_per_link_are_device_time():
    """Blocking send/recv on links of different speeds: a device's forward pays its link to the next device and
    its backward its link to the previous one; the closed form stays within 2% of the simulation of those busier
    devices without delays (the closed form of unequal stages, exact only when they are equal)."""
    p, m, links = 4, 8, [0.05, 0.4, 0.1]
    fwd, bwd = [[1.0]] * p, [[2.0]] * p
    out = [links[min(i, p - 2)] for i in range(p)]
    back = [links[max(i - 1, 0)] for i in range(p)]
    busy_f = [[f[0] + c] for f, c in zip(fwd, out)]
    busy_b = [[b[0] + c] for b, c in zip(bwd, back)]
    got = closed("1f1b", m, fwd, bwd, links, blocking=True)
    assert got == pytest.approx(makespan("1f1b", m, busy_f, busy_b), rel=0.02)
    assert got > closed("1f1b", m, fwd, bwd, links)


@given(p=st.integers(2, 8), mult=st.integers(4, 12), tf=st.floats(0.2, 2.0), ratio=st.floats(1.0, 3.0),
       seed=st.randoms(use_true_random=False))
@settings(max_examples=120, deadline=None)
def test_balanced_1f1b_with_links_of_different_speeds_within_2_percent(p, mult, tf, ratio, seed):
    """Balanced stages, m >= 4p, each link's delay 0 to 20% of a stage's forward (one slow link between node
    groups among fast ones, or several): the per-link closed form (steady state: the slowest loop of
    neighbouring devices) stays within 2% of the simulation."""
    m = p * mult
    fwd, bwd = [[tf]] * p, [[tf * ratio]] * p
    links = [seed.choice([0.0, 0.02, 0.2]) * seed.random() * tf for _ in range(p - 1)]
    assert closed("1f1b", m, fwd, bwd, links) == pytest.approx(makespan("1f1b", m, fwd, bwd, links), rel=0.02)


@given(p=st.integers(2, 6), mult=st.integers(4, 12), seed=st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_unbalanced_1f1b_with_links_of_different_speeds_within_8_percent(p, mult, seed):
    """Stages within +-30% of each other and per-link delays: within 8% of the simulation, the bound the
    one-delay form keeps on unequal stages (test_unbalanced_1f1b_and_interleaved_within_8_percent)."""
    m = p * mult
    fwd = [[seed.uniform(0.7, 1.3)] for _ in range(p)]
    bwd = [[2 * f[0] * seed.uniform(0.8, 1.2)] for f in fwd]
    links = [seed.choice([0.0, 0.01, 0.2]) * seed.random() for _ in range(p - 1)]
    assert closed("1f1b", m, fwd, bwd, links) == pytest.approx(makespan("1f1b", m, fwd, bwd, links), rel=0.08)


def test_1f1b_crossing_a_slow_link_once_beats_twice():
    """Four balanced stages, two pods joined by a slow link: placed A A B B the link is one hop, placed A B B A
    two; the simulation says the second pays the slow round trip on two loops of the steady state, and the
    closed form ranks them as the simulation does (the slowest-hop-everywhere form priced both alike)."""
    p, m, fast, slow = 4, 32, 0.004, 0.12
    fwd, bwd = [[1.0]] * p, [[2.0]] * p
    once, twice = [fast, slow, fast], [slow, fast, slow]
    sim_once, sim_twice = makespan("1f1b", m, fwd, bwd, once), makespan("1f1b", m, fwd, bwd, twice)
    assert sim_once < sim_twice
    assert closed("1f1b", m, fwd, bwd, once) < closed("1f1b", m, fwd, bwd, twice)
    assert closed("1f1b", m, fwd, bwd, once) == pytest.approx(sim_once, rel=0.01)
    assert closed("1f1b", m, fwd, bwd, twice) == pytest.approx(sim_twice, rel=0.01)


@given(schedule=st.sampled_from(["gpipe", "1f1b", "interleaved"]), blocking=st.booleans(), p=st.integers(2, 8),
       m=st.integers(1, 32), v=st.integers(2, 3), seed=st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_per_link_transfers_add_at_least_p2p_on_path(schedule, blocking, p, m, v, seed):
    """The search's lower bound: for any stage times and hop delays, the closed form is at least the balanced
    schedule of the same total work plus p2p_on_path of those hops; with alike links both forms are the one-delay
    ones for any stage times (cycle max(max D, mean D + 2c(p-1)/p) for asynchronous 1F1B)."""
    from planner.cost.pipeline import p2p_on_path
    v = v if schedule == "interleaved" else 1
    if schedule == "interleaved":
        m = p * max(1, m // p)
    fwd = [seed.uniform(0.5, 1.5) for _ in range(p)]
    bwd = [2 * f * seed.uniform(0.7, 1.3) for f in fwd]
    links = [seed.choice([0.0, 0.01, 0.3]) * seed.random() for _ in range(p - 1)]
    got = pipeline_time(schedule, m, fwd, bwd, links, v, blocking)[0]
    w = (sum(fwd) + sum(bwd)) / p
    balanced = (m + (p - 1) / v) * w if schedule == "interleaved" else (m + p - 1) * w
    assert got >= balanced + p2p_on_path(schedule, m, p, links, v, blocking) - 1e-9
    c = seed.uniform(0.0, 0.3)
    d = [f + b for f, b in zip(fwd, bwd)]
    alike = pipeline_time(schedule, m, fwd, bwd, [c] * (p - 1), v, blocking)[0]
    assert alike == pipeline_time(schedule, m, fwd, bwd, c, v, blocking)[0]
    if schedule == "1f1b" and not blocking:
        cycle = max(max(d), sum(d) / p + 2 * c * (p - 1) / p)
        assert alike == pytest.approx((m - 1) * cycle + sum(d) + 2 * c * ((p - 1) / p + p - 2), rel=1e-12)
