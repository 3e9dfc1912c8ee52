"""Step time of a pipeline schedule from per-device, per-micro-batch times.

Closed forms for the critical path (Narayanan et al. SC21 Sec. 2.2; Pipette's critical path for unequal
stages): the slowest device sets the steady state, the others add their fill and drain once. With per-device
time D_i = F_i + B_i and m micro-batches, p devices, v chunks per device:
  GPipe        : sum_i F_i + (m-1) max F + sum_i B_i + (m-1) max B
  1F1B         : (m-1) max D + sum_i D_i                  -> (m + p - 1) D when balanced
  interleaved  : m max D + (sum_i D_i - max D) / v        -> (m + (p-1)/v) D when balanced
A point-to-point transfer of c seconds between neighbouring stages either blocks both stages (blocking
send/recv: it is device time, 2c (2vc interleaved) added to every D_i), or runs beside compute and only
delays its receiver (asynchronous p2p). The asynchronous terms below are the exact makespans of the
discrete-event simulation (planner/cost/schedule.py) for balanced stages, found by enumerating it:
  GPipe: + 2(p-1)c (fill and drain only);
  1F1B: every steady-state cycle waits 2c(p-1)/p for the round trip between neighbours unless a faster
        stage's slack absorbs it: cycle = max(max D, mean D + 2c(p-1)/p), plus 2c((p-1)/p + p - 2) of fill;
  interleaved: the extra micro-batches in flight hide the transfers; only the fill and drain through all
        vp virtual stages wait: + 2(vp-1)c (while c stays below the chunks' compute, the usual case).
Links of different speeds (stages on node groups joined by a slow link) take one delay c_h per link h between
devices h and h + 1. Blocking: device h's forward pays its link to the next device, its backward its link to the
previous one (each end device pays its one link twice, as with one c). Asynchronous 1F1B: each run of
neighbouring devices a..b is a loop of the steady state (every micro-batch's activation and gradient cross its
links) whose cycle is (sum_{a..b} D_i + 2 sum_{a..b-1} c_h) / (b - a + 1) (the simulation's steady-state
slope); with the mean D in place of each run's own (the same for balanced stages; with one c, the form above for
any stages, the whole pipeline being the slowest loop), cycle = max(max D, mean D + loop), loop = max over runs
of 2 sum_{a..b-1} c_h / (b - a + 1), which no layer split changes, plus the fill with c the links' mean (not
derived: within 2% of the simulation for balanced stages and links up to a fifth of a forward, 8% for stages
within +-30%, as with one c; tests/test_pipeline_schedule.py); GPipe and interleaving pay each link on
their fill and drain (2 sum c_h; interleaving also the link from the last device back to the first, v - 1 times
each way).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from planner.cost.schedule import link_delays


def pipeline_time(schedule: str, m: int, fwd: list[float], bwd: list[float], p2p: float | Sequence[float],
                  vpp: int = 1, blocking_p2p: bool = True) -> tuple[float, int]:
    """(seconds, index of the critical device). `fwd`/`bwd`: one micro-batch's forward / backward time on
    each device (all its chunks); `p2p`: one activation transfer between neighbouring stages, one value for
    every link or one per link (p - 1 values, link h between devices h and h + 1; link_delays)."""
    p = len(fwd)
    links = link_delays(p2p, p)
    if p > 1 and max(links) > 0 and blocking_p2p:
        hops = vpp if schedule == "interleaved" else 1
        out = [links[min(i, p - 2)] for i in range(p)]          # forward: the link to the next device
        back = [links[max(i - 1, 0)] for i in range(p)]         # backward: the link to the previous one
        fwd = [x + hops * c for x, c in zip(fwd, out)]
        bwd = [x + hops * c for x, c in zip(bwd, back)]
    if p == 1 or blocking_p2p:
        links = [0.0] * p
    d = [x + y for x, y in zip(fwd, bwd)]
    crit = max(range(p), key=d.__getitem__)
    chain = sum(links[:p - 1])
    if schedule == "gpipe":
        return gpipe(m, sum(fwd), max(fwd), sum(bwd), max(bwd), 2 * chain), crit
    if schedule == "interleaved":
        return interleaved(m, vpp, d[crit], sum(d), 2 * (vpp * chain + (vpp - 1) * links[p - 1])), crit
    return one_f_one_b(m, p, d[crit], sum(d), *link_terms(links[:p - 1])), crit


def gpipe(m: int, f_sum: float, f_max: float, b_sum: float, b_max: float, transfers: float = 0.0) -> float:
    """The GPipe closed form (seconds) from the devices' forward and backward times per micro-batch (their sums
    and maxima, blocking transfers already in them) and what asynchronous transfers add (2 sum c_h; 0 for
    blocking ones)."""
    return f_sum + (m - 1) * f_max + b_sum + (m - 1) * b_max + transfers


def interleaved(m: int, v: int, d_max: float, d_sum: float, transfers: float = 0.0) -> float:
    """The interleaved closed form (seconds) from the slowest device's and all devices' forward plus backward
    time per micro-batch over their v chunks (d_max, d_sum; blocking transfers already in them) and what
    asynchronous transfers add (2 (v sum c_h + (v - 1) c_wrap); 0 for blocking ones)."""
    return m * d_max + (d_sum - d_max) / v + transfers


def one_f_one_b(m: int, p: int, d_max: float, d_sum: float, loop: float = 0.0, fill: float = 0.0) -> float:
    """The 1F1B closed form from the slowest device's and all devices' forward plus backward time per
    micro-batch (d_max, d_sum; blocking transfers already in them) and what asynchronous transfers add to the
    cycle and to the fill and drain (`link_terms`; 0 for blocking ones)."""
    if p == 1:
        return m * d_max
    return (m - 1) * max(d_max, d_sum / p + loop) + d_sum + fill


def link_terms(links: Sequence[float]) -> tuple[float, float]:
    """(loop, fill) of asynchronous 1F1B over links[h] between devices h and h + 1 (p - 1 of them; module
    docstring): loop, the largest 2 sum_{a..b-1} c_h / (b - a + 1) over runs of neighbouring devices a..b (one
    delay c: 2c (p-1)/p); fill, 2 c ((p-1)/p + p - 2) with c the links' mean."""
    return _link_terms(tuple(links))


@lru_cache(maxsize=4096)
def _link_terms(links: tuple[float, ...]) -> tuple[float, float]:
    """link_terms, once per distinct hops (the search asks for the same few thousands of times)."""
    p = len(links) + 1
    if p == 1:
        return 0.0, 0.0
    loop = 0.0
    for a in range(p - 1):
        both_ways = 0.0
        for b in range(a + 1, p):
            both_ways += 2 * links[b - 1]
            loop = max(loop, both_ways / (b - a + 1))
    c = sum(links) / (p - 1)
    return loop, 2 * c * ((p - 1) / p + p - 2)


def p2p_on_path(schedule: str, m: int, p: int, p2p: float | Sequence[float], vpp: int = 1,
                blocking_p2p: bool = True) -> float:
    """Seconds pipeline transfers add to the schedule's closed form for balanced stages, and the least they add
    whatever the stage times (the search's lower bound): blocking, each device's links to the next and the
    previous device in its cycle, at least their mean over the devices; asynchronous, the transfer terms of
    `pipeline_time`, whose stage terms are at least the balanced ones."""
    links = link_delays(p2p, p)
    if p == 1 or max(links) <= 0:
        return 0.0
    chain = sum(links[:p - 1])
    if blocking_p2p:
        hops = vpp if schedule == "interleaved" else 1
        per_cycle = hops * (2 * chain + links[0] + links[p - 2]) / p
        cycles = m + p - 1 if schedule != "interleaved" else m + (p - 1) / vpp
        return per_cycle * cycles
    if schedule == "gpipe":
        return 2 * chain
    if schedule == "interleaved":
        return 2 * (vpp * chain + (vpp - 1) * links[p - 1])
    loop, fill = link_terms(links[:p - 1])
    return (m - 1) * loop + fill
