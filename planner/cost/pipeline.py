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
"""

from __future__ import annotations


def pipeline_time(schedule: str, m: int, fwd: list[float], bwd: list[float], p2p: float, vpp: int = 1,
                  blocking_p2p: bool = True) -> tuple[float, int]:
    """(seconds, index of the critical device). `fwd`/`bwd`: one micro-batch's forward / backward time on
    each device (all its chunks); `p2p`: one activation transfer between neighbouring stages."""
    p = len(fwd)
    c = p2p if p > 1 else 0.0
    if blocking_p2p and c > 0:
        hops = vpp if schedule == "interleaved" else 1
        fwd = [x + hops * c for x in fwd]
        bwd = [x + hops * c for x in bwd]
        c = 0.0
    d = [x + y for x, y in zip(fwd, bwd)]
    crit = max(range(p), key=d.__getitem__)
    if schedule == "gpipe":
        return sum(fwd) + (m - 1) * max(fwd) + sum(bwd) + (m - 1) * max(bwd) + 2 * (p - 1) * c, crit
    if schedule == "interleaved":
        return m * d[crit] + (sum(d) - d[crit]) / vpp + 2 * (vpp * p - 1) * c, crit
    return one_f_one_b(m, p, d[crit], sum(d), c), crit


def one_f_one_b(m: int, p: int, d_max: float, d_sum: float, p2p: float) -> float:
    """The 1F1B closed form from the slowest device's and all devices' forward plus backward time per
    micro-batch (d_max, d_sum; blocking transfers already in them, then p2p = 0) and an asynchronous transfer's
    p2p seconds (see the module docstring)."""
    if p == 1:
        return m * d_max
    cycle = max(d_max, d_sum / p + 2 * p2p * (p - 1) / p)
    return (m - 1) * cycle + d_sum + 2 * p2p * ((p - 1) / p + p - 2)


def p2p_on_path(schedule: str, m: int, p: int, p2p: float, vpp: int = 1, blocking_p2p: bool = True) -> float:
    """Seconds of a step spent on pipeline transfers along the critical path (for the time breakdown)."""
    if p == 1 or p2p <= 0:
        return 0.0
    if blocking_p2p:
        hops = vpp if schedule == "interleaved" else 1
        per_cycle = 2 * hops * p2p
        cycles = m + p - 1 if schedule != "interleaved" else m + (p - 1) / vpp
        return per_cycle * cycles
    if schedule == "gpipe":
        return 2 * (p - 1) * p2p
    if schedule == "interleaved":
        return 2 * (vpp * p - 1) * p2p
    return 2 * p2p * ((m - 1) * (p - 1) / p + (p - 1) / p + p - 2)
