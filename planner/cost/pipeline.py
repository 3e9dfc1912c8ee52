"""Step time of a pipeline schedule from per-device, per-micro-batch times.

Closed forms for the critical path (Narayanan et al. SC21 Sec. 2.2; Pipette's critical path for unequal
stages): the slowest device sets the steady state, the others add their fill and drain once.
With per-device time D_i = F_i + B_i (+ the device's p2p transfers) and m micro-batches:
  GPipe        : sum_i F_i + (m-1) max F + sum_i B_i + (m-1) max B
  1F1B         : (m-1) max D + sum_i D_i                  -> (m + p - 1) D when balanced
  interleaved  : m max D + (sum_i D_i - max D) / v        -> (m + (p-1)/v) D when balanced
"""

from __future__ import annotations


def pipeline_time(schedule: str, m: int, fwd: list[float], bwd: list[float], p2p: float,
                  vpp: int = 1) -> tuple[float, int]:
    """(seconds, index of the critical device). `fwd`/`bwd`: one micro-batch's forward / backward time on
    each device (all its chunks); `p2p`: one activation transfer between neighbouring stages."""
    p = len(fwd)
    c = p2p if p > 1 else 0.0
    if schedule == "gpipe":
        f = [x + c for x in fwd]
        b = [x + c for x in bwd]
        d = [x + y for x, y in zip(f, b)]
        crit = max(range(p), key=d.__getitem__)
        return sum(f) + (m - 1) * max(f) + sum(b) + (m - 1) * max(b), crit
    transfers = 2 * (vpp if schedule == "interleaved" else 1) * c
    d = [x + y + transfers for x, y in zip(fwd, bwd)]
    crit = max(range(p), key=d.__getitem__)
    if schedule == "interleaved":
        return m * d[crit] + (sum(d) - d[crit]) / vpp, crit
    return (m - 1) * d[crit] + sum(d), crit
