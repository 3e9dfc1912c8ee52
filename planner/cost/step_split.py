"""The 1F1B layer split that minimises the step as planner.cost.step charges it, DP/ZeRO exposure included.

With per-device times from `step.device_times` (d_i: forward plus backward of one micro-batch, exposed ZeRO
traffic and blocking transfers included; b_i: its backward; f_i: exposed gathers of the step's first forward;
e_i: communication after the last backward plus the optimizer step), with c_h the transfer on the hop from
device h to h + 1, the 1F1B step of a split is
    one_f_one_b(m, p, max_i d_i, sum_i d_i, loop, fill) + max_i (e_i - s_i) + max_i f_i + host_step,
    s_i = sum_{k<i} (b_k + c_k)   (device i finishes its last backward s_i before device 0),
which is what `step_times` computes (planner/cost/pipeline.py for the closed form: blocking transfers are in
d_i, device i's hop to the next device and to the previous one, and loop = fill = 0; asynchronous ones add
`link_terms`, which no split changes). It is not a min-max of separable stage costs (its maxima are over
different devices, and s_i depends on the devices before i), so the min-max split of planner.partition is not
its optimum, nor is a min-max of m d_i + e_i.
The split here is exact: a dynamic program over the devices in pipeline order whose state is the blocks
placed so far, keeping at each state every label (max d, sum d, s, max(e - s), max f) that no other label
beats in all five (the step rises with each of them but s, with which it falls; once no later device can end
after the worst one so far, s no longer matters). Every block count within the bounds below is tried, so e
and f need not rise with the blocks (a larger backward hides more of a stage's fixed reduction, so its
exposure can fall as it grows). Bounds: a split beats the time-only one (`start`) only with max d <= T, where
(m-1) T + (sum d without any DP traffic) + the closed form's transfers + host_step = the step of `start`
(the exposure terms are >= 0), which caps each device's blocks where its compute alone passes T or it runs
out of memory (`fits`, which rises with the blocks); labels whose lower bound reaches the step of `start` are
dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

from planner.cost.pipeline import link_terms, one_f_one_b
from planner.cost.step import DeviceTimes

# A split must beat the time-only split by this share of its step to replace it (ties keep the time-only one).
RELATIVE_GAIN = 1e-12
# Sums of the same stage times in another order differ by rounding: labels within this share of the step in
# sum d and slack are alike (what it can cost, at most (m + 1) times it, stays far below RELATIVE_GAIN's scale).
SUM_NOISE = 1e-14


def best_1f1b_split(num_layers: int, nmb: int, start: list[int], times: Callable[[int, int], tuple[DeviceTimes, float]],
                    fits: Callable[[int, int], bool], links: Sequence[float], blocking: bool, host_step: float,
                    block_floor: float, extra_floor: list[float]) -> list[int]:
    """Blocks per device minimising the 1F1B step. `start`: a split that fits (the time-only one);
    `times(i, n)`: (DeviceTimes, optimizer seconds) of device i holding n blocks; `fits(i, n)`: whether it fits
    in memory (monotone in n); links: one transfer on each hop (links[h] from device h to h + 1, p - 1 of
    them), `blocking`: transfers block the devices; `block_floor`, `extra_floor[i]`: seconds with
    d_i(n) >= n * block_floor + extra_floor[i] (its compute without any data-parallel communication)."""
    p, L, m = len(start), num_layers, nmb
    hops = [float(x) for x in links]
    if len(hops) != p - 1:
        raise ValueError(f"{len(hops)} hop delays for {p} devices (expected {p - 1})")
    # a blocking transfer is device time on each pass: a forward's hop to the next device, a backward's to the
    # previous one; asynchronous ones enter the closed form as delays
    out = [hops[min(i, p - 2)] if blocking else 0.0 for i in range(p)]
    back = [hops[max(i - 1, 0)] if blocking else 0.0 for i in range(p)]
    c = (0.0, 0.0) if blocking else link_terms(hops)        # (loop, fill)
    hops.append(0.0)                                         # nothing after the last device

    def stage(i: int, n: int) -> tuple[float, float, float, float]:
        """(d, b + its hop to the next device, f, e) of device i holding n blocks."""
        t, opt = times(i, n)
        return (t.fwd + out[i]) + (t.bwd + back[i]), t.bwd + hops[i], t.first, t.post + opt

    def step_of(split: list[int]) -> float:
        d_max = d_sum = slack = 0.0
        worst_end = first = -math.inf
        for i, n in enumerate(split):
            d, b, f, e = stage(i, n)
            d_max, d_sum = max(d_max, d), d_sum + d
            worst_end, first = max(worst_end, e - slack), max(first, f)
            slack += b
        return one_f_one_b(m, p, d_max, d_sum, *c) + worst_end + first + host_step

    best = step_of(start)
    floor_sum = L * block_floor + sum(extra_floor)
    transfers = c[1]       # the closed form's fill and drain transfers
    d_cap = (best - host_step - transfers - floor_sum) / (m - 1) if m > 1 else math.inf
    d_cap *= 1 + RELATIVE_GAIN

    # the most blocks each device may take: its d within d_cap (its compute alone past d_cap ends the search: d
    # need not rise with every block), within memory (which does)
    caps = []
    for i, n in enumerate(start):
        cap = n
        while n < L - (p - 1) and (n + 1) * block_floor + extra_floor[i] <= d_cap:
            n += 1
            if stage(i, n)[0] <= d_cap:
                if not fits(i, n):
                    break
                cap = n
        caps.append(cap)
    if caps == start:
        return start          # no device can take a block more: only the time-only split is left
    after = [sum(caps[i + 1:]) for i in range(p)]          # the most the devices after i can take
    floor_after = [sum(extra_floor[i + 1:]) for i in range(p)]
    # what the devices after i add at least: the largest of their least d and least f over the blocks they may
    # hold (from the fewest, with all others at their caps, to their caps)
    fewest = [max(1, L - (sum(caps) - cap)) for cap in caps]
    rows = [{n: stage(i, n) for n in range(fewest[i], caps[i] + 1)} for i in range(p)]   # times by blocks held
    d_after, f_after, e_after = [0.0] * p, [0.0] * p, [-math.inf] * p
    for j in range(p - 1, 0, -1):
        d_after[j - 1] = max(d_after[j], min(t[0] for t in rows[j].values()))
        f_after[j - 1] = max(f_after[j], min(t[2] for t in rows[j].values()))
        e_after[j - 1] = max(e_after[j], max(t[3] for t in rows[j].values()))

    tol = SUM_NOISE * best
    cut = best / (1 - RELATIVE_GAIN)      # a label whose bound reaches this cannot beat `best` by RELATIVE_GAIN
    # labels: (d_max, d_sum, slack, worst_end, first, (blocks of this device, the label it extends)), per blocks
    # placed
    states: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, -math.inf, 0.0, None)]}
    for i in range(p):
        nxt: dict[int, list[tuple]] = {}
        left = p - 1 - i
        for placed, labels in states.items():
            lo, hi = max(1, L - placed - after[i]), min(caps[i], L - placed - left)
            for n in range(lo, hi + 1):
                d, b, f, e = rows[i][n]
                rest = (L - placed - n) * block_floor + floor_after[i]
                rest_max = max(rest / left if left else 0.0, d_after[i])
                front = None
                for label in labels:
                    d_max, d_sum, slack, worst_end, first = label[:5]
                    d_max, d_sum, first = max(d_max, d), d_sum + d, max(first, f)
                    worst_end = max(worst_end, e - slack)
                    bound = (one_f_one_b(m, p, max(d_max, rest_max), d_sum + rest, *c) + worst_end
                             + max(first, f_after[i]) + host_step)
                    if bound >= cut:
                        continue
                    slack += b
                    if e_after[i] - slack <= worst_end:     # no later device can end after the worst one:
                        slack = math.inf                     # more slack cannot help
                    if front is None:
                        front = nxt.setdefault(placed + n, [])
                    _keep(front, (d_max, d_sum, slack, worst_end, first, (n, label)), tol)
        states = nxt
    chosen = start
    for d_max, d_sum, _, worst_end, first, link in states.get(L, []):
        step = one_f_one_b(m, p, d_max, d_sum, *c) + worst_end + first + host_step
        if step < best * (1 - RELATIVE_GAIN):
            best, chosen = step, _split_of(link)
    return chosen


def _split_of(link: tuple) -> list[int]:
    """The blocks per device of a final label, from its chain of (blocks, previous label)."""
    split = []
    while link is not None:
        n, label = link
        split.append(n)
        link = label[5]
    return split[::-1]


def _keep(front: list[tuple], label: tuple, tol: float) -> None:
    """Add `label` to `front` unless a label there is at least as good in every term (lower max d, sum d,
    worst end and first; higher slack); drop those it beats so. Sums d and slacks within `tol` seconds count as
    equal (the same blocks summed in another order)."""
    d_max, d_sum, slack, worst_end, first = label[:5]
    for o in front:
        if o[0] <= d_max and o[1] <= d_sum + tol and o[2] >= slack - tol and o[3] <= worst_end and o[4] <= first:
            return
    front[:] = [o for o in front if not (d_max <= o[0] and d_sum <= o[1] + tol and slack >= o[2] - tol
                                         and worst_end <= o[3] and first <= o[4])]
    front.append(label)
