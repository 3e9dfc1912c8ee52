"""The layer split that minimises the step as planner.cost.step charges it, DP/ZeRO exposure included (1F1B,
GPipe and interleaved schedules).

With per-device times from `step.device_times` (F_i, B_i: forward and backward of one micro-batch, exposed ZeRO
traffic and blocking transfers included, d_i = F_i + B_i; f_i: exposed gathers of the step's first forward;
e_i: communication after the last backward plus the optimizer step), with c_h the transfer on the hop from
device h to h + 1, the step of a split is
    pipe + max_i (e_i - s_i) + max_i f_i + host_step,
    s_i = sum_{k<i} (B_k / v + c_k)   (device i finishes its last backward s_i before device 0; v chunks per
                                      device interleaved, else 1; B_k here without blocking transfers),
which is what `step_times` computes, with pipe the schedule's closed form (planner/cost/pipeline.py, after
Narayanan et al. SC21 Sec. 2.2; blocking transfers are in F_i and B_i, v times interleaved, and loop = fill = 0;
asynchronous ones add terms no split changes):
    1F1B         one_f_one_b(m, p, max d, sum d, loop, fill)
    GPipe        sum d + (m - 1) (max F + max B) + 2 sum c_h
    interleaved  m max d + (sum d - max d) / v + 2 (v sum c_h + (v - 1) c_wrap).
It is not a min-max of separable stage costs (its maxima are over different devices, and s_i depends on the
devices before i), so the min-max split of planner.partition is not its optimum, nor is a min-max of m d_i + e_i.
The split here is exact: a dynamic program over the devices in pipeline order whose state is the blocks
placed so far, keeping at each state every label (its peaks: max d, or GPipe's max F and max B; sum d, s,
max(e - s), max f) that no other label beats in all of them (the step rises with each of them but s, with
which it falls; once no later device can end after the worst one so far, s no longer matters). Every block
count within the bounds below is tried, so e and f need not rise with the blocks (a larger backward hides more
of a stage's fixed reduction, so its exposure can fall as it grows). Bounds: a split beats the given one
(`start`) only with max d <= T, where the closed form with max d = T and sum d at its floor (the devices'
compute without any DP traffic) plus host_step is the step of `start` (the exposure terms are >= 0; GPipe:
max F + max B >= max d), which caps each device's blocks where its compute alone passes T or it runs out of
memory (`fits`, which rises with the blocks); labels whose lower bound reaches the step of `start` are
dropped.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Callable

from planner.cost.pipeline import gpipe, interleaved, link_terms, one_f_one_b
from planner.cost.schedule import link_delays
from planner.cost.step import DeviceTimes

# A split must beat the time-only split by this share of its step to replace it (ties keep the time-only one).
RELATIVE_GAIN = 1e-12
# Sums of the same stage times in another order differ by rounding: labels within this share of the step in
# sum d and slack are alike (what it can cost, at most (m + 1) times it, stays far below RELATIVE_GAIN's scale).
SUM_NOISE = 1e-14


def best_split(schedule: str, vpp: int, num_layers: int, nmb: int, start: list[int],
               times: Callable[[int, int], tuple[DeviceTimes, float]], fits: Callable[[int, int], bool],
               links: Sequence[float], blocking: bool, host_step: float, block_floor: float,
               extra_floor: list[float], least: int = 1,
               blocks_key: Callable[[int, int], Hashable] | None = None) -> list[int]:
    """Blocks per device (each at least `least`) minimising the step of `schedule` ("1f1b", "gpipe" or
    "interleaved" over vpp chunks per device); `start` unless a split beats it by RELATIVE_GAIN. `start`: a
    split that fits (the time-only one); `times(i, n)`: (DeviceTimes, optimizer seconds) of device i holding n
    blocks; `fits(i, n)`: whether it fits in memory (monotone in n); links: one transfer on each hop (links[h]
    from device h to h + 1, p - 1 of them), `blocking`: transfers block the devices; `block_floor`,
    `extra_floor[i]`: seconds with d_i(n) >= n * block_floor + extra_floor[i] (its compute without any
    data-parallel communication). `blocks_key(first, n)`: given when the blocks differ (dense and MoE layers),
    what the n blocks from block `first` on are (equal keys: equal blocks); `times(i, first, n)` and
    `fits(i, first, n)` then take the index of the device's first block too (1F1B and GPipe: the state of the
    program is that index), each device's caps and the bounds on the devices after it range over every position
    its first block can take, `block_floor` must not exceed the lightest block's, and `times` must treat the
    devices between the first and the last alike."""
    positional = blocks_key is not None
    if not positional:
        by_count, fits_count = times, fits
        times = lambda i, first, n: by_count(i, n)            # noqa: E731
        fits = lambda i, first, n: fits_count(i, n)           # noqa: E731
    elif schedule == "interleaved":
        raise ValueError("an interleaved device's blocks are not one range: its split is not positional")
    p, L, m = len(start), num_layers, nmb
    hops = [float(x) for x in links]
    if len(hops) != p - 1:
        raise ValueError(f"{len(hops)} hop delays for {p} devices (expected {p - 1})")
    v = vpp if schedule == "interleaved" else 1
    # a blocking transfer is device time on each pass (v of them interleaved): a forward's hop to the next
    # device, a backward's to the previous one; asynchronous ones enter the closed form as delays
    out = [v * hops[min(i, p - 2)] if blocking else 0.0 for i in range(p)]
    back = [v * hops[max(i - 1, 0)] if blocking else 0.0 for i in range(p)]
    pipe, bound_pipe, transfers = _closed_form(schedule, m, p, v, hops, blocking)
    hops.append(0.0)                       # no slack after the last device

    staged: dict[tuple, tuple] = {}
    fitted: dict[tuple, bool] = {}
    kinds: dict[int, list] = {}        # kinds[n][first]: what the n blocks from `first` on are (positional only)

    def kinds_of(n: int) -> list:
        hit = kinds.get(n)
        if hit is None:
            hit = kinds[n] = [blocks_key(first, n) for first in range(L - n + 1)]
        return hit

    # devices alike in what `times` sees (first, last or middle) and in their transfers cost alike
    alike = [(i == 0, i == p - 1, out[i], back[i], hops[i]) for i in range(p)]

    def key_of(i: int, first: int, n: int) -> tuple:
        return (alike[i], kinds_of(n)[first]) if positional else (i, n)

    def placings(i: int, n: int) -> dict:
        """One first block for each different content device i can hold n blocks of ({key: first})."""
        if not positional:
            return {n: 0}
        lo, hi = i * least, L - (p - 1 - i) * least - n       # hi: the devices after i keep `least` each
        found: dict = {}
        row = kinds_of(n)
        for first in range(lo, hi + 1):
            found.setdefault(row[first], first)
        return found

    def stage(i: int, first: int, n: int) -> tuple[float, float, float, float, float, float]:
        """(peak term 1, peak term 2, d, b / v + its hop to the next device, f, e) of device i holding n blocks
        from block `first` on: GPipe's peaks are its forward and backward, the others' d and 0."""
        key = key_of(i, first, n)
        hit = staged.get(key)
        if hit is None:
            t, opt = times(i, first, n)
            fwd, bwd = t.fwd + out[i], t.bwd + back[i]
            pk1, pk2 = (fwd, bwd) if schedule == "gpipe" else (fwd + bwd, 0.0)
            hit = staged[key] = (pk1, pk2, fwd + bwd, t.bwd / v + hops[i], t.first, t.post + opt)
        return hit

    def fits_at(i: int, first: int, n: int) -> bool:
        key = (i, kinds_of(n)[first]) if positional else (i, n)
        hit = fitted.get(key)
        if hit is None:
            hit = fitted[key] = fits(i, first, n)
        return hit

    def step_of(split: list[int]) -> float:
        pk1 = pk2 = d_sum = slack = 0.0
        worst_end = first = -math.inf
        for i, n in enumerate(split):
            a, b, d, s_i, f, e = stage(i, sum(split[:i]), n)
            pk1, pk2, d_sum = max(pk1, a), max(pk2, b), d_sum + d
            worst_end, first = max(worst_end, e - slack), max(first, f)
            slack += s_i
        return pipe(pk1, pk2, d_sum) + worst_end + first + host_step

    # a start that does not fit (positional: it was chosen with mean blocks) bounds nothing
    start_fits = not positional or all(fits_at(i, sum(start[:i]), n) for i, n in enumerate(start))
    best = step_of(start) if start_fits else math.inf
    floor_sum = L * block_floor + sum(extra_floor)
    # no device's d passes d_cap in a split that beats `start`: the closed form with max d = d_cap, sum d at its
    # floor, is the step of `start` less host_step (the exposure terms are >= 0)
    d_cap = _d_cap(schedule, m, v, best - host_step - transfers, floor_sum) * (1 + RELATIVE_GAIN)

    # the most blocks each device may take: its d within d_cap (its compute alone past d_cap ends the search: d
    # need not rise with every block), within memory (which does)
    # (positional: over every content the device can hold n blocks of; once none fits, no larger n fits)
    caps = []
    for i, n in enumerate(start):
        cap = n
        while n < L - (p - 1) * least and (n + 1) * block_floor + extra_floor[i] <= d_cap:
            n += 1
            within = [first for first in placings(i, n).values() if stage(i, first, n)[2] <= d_cap]
            fitting = [first for first in within if fits_at(i, first, n)]
            if within and not fitting and all(not fits_at(i, first, n) for first in placings(i, n).values()):
                break
            if fitting:
                cap = n
        caps.append(cap)
    if caps == start:
        return start          # no device can take a block more: only the time-only split is left
    after = [sum(caps[i + 1:]) for i in range(p)]          # the most the devices after i can take
    floor_after = [sum(extra_floor[i + 1:]) for i in range(p)]
    # what the devices after i add at least: the largest of their least d and least f over the blocks they may
    # hold (from the fewest, with all others at their caps, to their caps)
    fewest = [max(least, L - (sum(caps) - cap)) for cap in caps]
    d_after, f_after, e_after = [0.0] * p, [0.0] * p, [-math.inf] * p
    for j in range(p - 1, 0, -1):
        held = [stage(j, first, n) for n in range(fewest[j], caps[j] + 1) for first in placings(j, n).values()]
        d_after[j - 1] = max(d_after[j], min((t[2] for t in held), default=0.0))
        f_after[j - 1] = max(f_after[j], min((t[4] for t in held), default=0.0))
        e_after[j - 1] = max(e_after[j], max((t[5] for t in held), default=-math.inf))

    tol = SUM_NOISE * best if math.isfinite(best) else 0.0
    cut = best / (1 - RELATIVE_GAIN)      # a label whose bound reaches this cannot beat `best` by RELATIVE_GAIN
    # labels: (peak 1, peak 2, d_sum, slack, worst_end, first, (blocks of this device, the label it extends)), per
    # blocks placed
    states: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, 0.0, -math.inf, 0.0, None)]}
    for i in range(p):
        nxt: dict[int, list[tuple]] = {}
        left = p - 1 - i
        for placed, labels in states.items():
            lo, hi = max(least, L - placed - after[i]), min(caps[i], L - placed - left * least)
            for n in range(lo, hi + 1):
                if positional and not fits_at(i, placed, n):
                    break                 # memory rises with the blocks
                a, b, d, s_i, f, e = stage(i, placed, n)
                rest = (L - placed - n) * block_floor + floor_after[i]
                rest_max = max(rest / left if left else 0.0, d_after[i])
                front = None
                for label in labels:
                    pk1, pk2, d_sum, slack, worst_end, first = label[:6]
                    pk1, pk2, d_sum, first = max(pk1, a), max(pk2, b), d_sum + d, max(first, f)
                    worst_end = max(worst_end, e - slack)
                    bound = (bound_pipe(pk1, pk2, d_sum + rest, rest_max) + worst_end + max(first, f_after[i])
                             + host_step)
                    if bound >= cut:
                        continue
                    slack += s_i
                    if e_after[i] - slack <= worst_end:     # no later device can end after the worst one:
                        slack = math.inf                     # more slack cannot help
                    if front is None:
                        front = nxt.setdefault(placed + n, [])
                    _keep(front, (pk1, pk2, d_sum, slack, worst_end, first, (n, label)), tol)
        states = nxt
    chosen = start
    for pk1, pk2, d_sum, _, worst_end, first, link in states.get(L, []):
        step = pipe(pk1, pk2, d_sum) + worst_end + first + host_step
        if step < best * (1 - RELATIVE_GAIN):
            best, chosen = step, _split_of(link)
    return chosen


def _closed_form(schedule: str, m: int, p: int, v: int, hops: list[float], blocking: bool
                 ) -> tuple[Callable[[float, float, float], float], Callable[[float, float, float, float], float],
                            float]:
    """(pipe, bound, transfers) of `schedule` (planner.cost.pipeline): pipe(peak 1, peak 2, sum d), the closed
    form of a whole split; bound(peak 1, peak 2, sum d, least d of a later device), the least it can reach from
    a partial split (its peaks so far, its sum d with the rest's floor); both rise with every argument.
    transfers: seconds the closed form adds to its stage terms whatever the split (asynchronous transfers' fill
    and drain; 0 when blocking)."""
    if schedule == "gpipe":
        chain = 0.0 if blocking else 2 * sum(hops)
        # the forward and backward maxima, each at least the other's device's share: f_max + b_max >= max_i d_i
        return (lambda f_max, b_max, d_sum: gpipe(m, d_sum, f_max, 0.0, b_max, chain),
                lambda f_max, b_max, d_sum, rest: d_sum + (m - 1) * max(f_max + b_max, rest) + chain, chain)
    if schedule == "interleaved":
        links = link_delays(hops, p)
        wrap = 0.0 if blocking else 2 * (v * sum(links[:p - 1]) + (v - 1) * links[p - 1])
        return (lambda d_max, _, d_sum: interleaved(m, v, d_max, d_sum, wrap),
                lambda d_max, _, d_sum, rest: interleaved(m, v, max(d_max, rest), d_sum, wrap), wrap)
    loop, fill = (0.0, 0.0) if blocking else link_terms(hops)
    return (lambda d_max, _, d_sum: one_f_one_b(m, p, d_max, d_sum, loop, fill),
            lambda d_max, _, d_sum, rest: one_f_one_b(m, p, max(d_max, rest), d_sum, loop, fill), fill)


def _d_cap(schedule: str, m: int, v: int, budget: float, floor_sum: float) -> float:
    """The largest max d a split can have with its closed form (transfers aside) within `budget` seconds, its sum
    d at least floor_sum: (m - 1) T + floor_sum (1F1B, GPipe: f_max + b_max >= max d), m T + (floor_sum - T) / v
    (interleaved)."""
    if schedule == "interleaved":
        return (budget - floor_sum / v) / (m - 1 / v)
    return (budget - floor_sum) / (m - 1) if m > 1 else math.inf


def _split_of(link: tuple) -> list[int]:
    """The blocks per device of a final label, from its chain of (blocks, previous label)."""
    split = []
    while link is not None:
        n, label = link
        split.append(n)
        link = label[6]
    return split[::-1]


def _keep(front: list[tuple], label: tuple, tol: float) -> None:
    """Add `label` to `front` unless a label there is at least as good in every term (lower peaks, sum d,
    worst end and first; higher slack); drop those it beats so. Sums d and slacks within `tol` seconds count as
    equal (the same blocks summed in another order)."""
    pk1, pk2, d_sum, slack, worst_end, first = label[:6]
    for o in front:
        if (o[0] <= pk1 and o[1] <= pk2 and o[2] <= d_sum + tol and o[3] >= slack - tol and o[4] <= worst_end
                and o[5] <= first):
            return
    front[:] = [o for o in front if not (pk1 <= o[0] and pk2 <= o[1] and d_sum <= o[2] + tol and slack >= o[3] - tol
                                         and worst_end <= o[4] and first <= o[5])]
    front.append(label)
