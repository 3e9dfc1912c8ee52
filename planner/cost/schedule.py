"""A discrete-event simulation of one step's pipeline schedule: GPipe, 1F1B and interleaved 1F1B.

The reference for planner/cost/pipeline.py's closed forms (tests/test_pipeline_schedule.py) and the source of
the pipeline timeline `meshplan report` draws. Each device runs its operations in the schedule's order
(Megatron-LM's orders); an operation starts when its device is free and the operation it depends on (the
previous virtual stage's forward, the next virtual stage's backward) has finished and its activation or
gradient has crossed the link. A transfer is a link delay of `p2p` seconds, not busy device time: the device
that sends goes on with its next operation. (The closed forms charge every transfer to the device's cycle
instead: for balanced stages they sit above this simulation, by at most the transfers they charge.) Link
delays are what the hardware does, so this stays the reference however pipeline.py charges transfers.

An operation's work is either plain seconds or a sequence of (kind, seconds) pieces run back to back (e.g.
recompute, then backward, then the TP collectives), so the timeline can show what the device is doing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

Piece = tuple[str, float]          # (kind, seconds)
Work = float | Sequence[Piece]     # one micro-batch's forward or backward of one chunk on one device


class Op(NamedTuple):
    """One operation: `device` runs `op` ("F" forward, "B" backward) of local chunk `chunk` (virtual stage
    chunk * pp + device) for `microbatch` from `start` to `end` (seconds from the step's start), as `pieces`
    run back to back."""

    device: int
    chunk: int
    microbatch: int
    op: str
    start: float
    end: float
    pieces: tuple[Piece, ...]

    def parts(self) -> Iterator[tuple[str, float, float]]:
        """(kind, start, end) of each piece."""
        t = self.start
        for kind, seconds in self.pieces:
            yield kind, t, t + seconds
            t += seconds


class Transfer(NamedTuple):
    """An activation (forward) or gradient (backward) crossing the link between two devices."""

    src: int
    dst: int
    microbatch: int
    what: str          # "activation" or "gradient"
    start: float
    end: float


@dataclass
class Timeline:
    """Each device's operations in execution order (rows[i]), every transfer, and the makespan (seconds)."""

    rows: list[list[Op]]
    transfers: list[Transfer] = field(default_factory=list)
    makespan: float = 0.0

    @property
    def ops(self) -> Iterator[Op]:
        for row in self.rows:
            yield from row

    def busy(self, device: int) -> dict[str, float]:
        """Seconds `device` spends on each kind of work."""
        out: dict[str, float] = {}
        for o in self.rows[device]:
            for kind, seconds in o.pieces:
                out[kind] = out.get(kind, 0.0) + seconds
        return out


def device_order(schedule: str, p: int, v: int, m: int, device: int) -> list[tuple[str, int, int]]:
    """(op, chunk, micro-batch) in execution order on one device (Megatron-LM's orders; interleaving needs m
    divisible by p)."""
    if schedule == "gpipe":
        return [("F", 0, j) for j in range(m)] + [("B", 0, j) for j in range(m)]
    if schedule == "1f1b":
        warm = min(p - device - 1, m)
        fwd = [("F", 0, j) for j in range(m)]
        bwd = [("B", 0, j) for j in range(m)]
        order = fwd[:warm]
        for j in range(m - warm):
            order += [fwd[warm + j], bwd[j]]
        return order + bwd[m - warm:]
    if schedule != "interleaved":
        raise ValueError(f"unknown schedule {schedule!r}")
    total = m * v

    def fwd_op(k: int) -> tuple[str, int, int]:
        return ("F", (k // p) % v, (k // (p * v)) * p + k % p)

    def bwd_op(k: int) -> tuple[str, int, int]:
        return ("B", v - 1 - (k // p) % v, (k // (p * v)) * p + k % p)

    warm = min((p - device - 1) * 2 + (v - 1) * p, total)
    order = [fwd_op(k) for k in range(warm)]
    for k in range(total - warm):
        order += [fwd_op(warm + k), bwd_op(k)]
    return order + [bwd_op(k) for k in range(total - warm, total)]


def _pieces(work: Work, kind: str) -> tuple[Piece, ...]:
    if isinstance(work, (int, float)):
        work = [(kind, work)]
    return tuple((k, float(x)) for k, x in work if x > 0)


def link_delays(p2p: float | Sequence[float], p: int) -> list[float]:
    """Seconds an activation or gradient takes on each link, links[i] between device i and device (i + 1) % p,
    from one value for every link or one per link (p - 1 of them; the p-th, from the last device back to the
    first, only interleaving uses, and it defaults to the slowest of the others)."""
    if p == 1:
        return [0.0]
    if isinstance(p2p, (int, float)):
        return [float(p2p)] * p
    links = [float(x) for x in p2p]
    if len(links) == p - 1:
        links.append(max(links))
    if len(links) != p:
        raise ValueError(f"p2p: {len(links)} link delays for {p} devices (expected {p - 1} or {p})")
    return links


def simulate(schedule: str, m: int, fwd: Sequence[Sequence[Work]], bwd: Sequence[Sequence[Work]],
             p2p: float | Sequence[float] = 0.0) -> Timeline:
    """Run one step of `m` micro-batches. fwd[i][c] / bwd[i][c]: one micro-batch's forward / backward of local
    chunk c on device i (seconds, or (kind, seconds) pieces); `p2p`: seconds an activation or gradient takes
    between neighbouring devices, one value for every link or one per link (link_delays)."""
    p, v = len(fwd), len(fwd[0])
    last = p * v - 1
    links = link_delays(p2p, p)
    f_done = [[-1.0] * m for _ in range(last + 1)]   # finish time of (virtual stage, micro-batch); -1: not yet
    b_done = [[-1.0] * m for _ in range(last + 1)]
    plans = []
    for i in range(p):
        steps = []
        for op, chunk, j in device_order(schedule, p, v, m, i):
            g = chunk * p + i
            pieces = _pieces((fwd if op == "F" else bwd)[i][chunk], "forward" if op == "F" else "backward")
            if op == "F":   # (the table it waits on, the stage there, whether it comes over a link)
                dep = (f_done, g - 1, p > 1) if g > 0 else (None, 0, False)
            else:
                dep = (b_done, g + 1, p > 1) if g < last else (f_done, g, False)
            steps.append((op, chunk, j, g, *dep, pieces, sum(x for _, x in pieces)))
        plans.append(steps)
    out = Timeline(rows=[[] for _ in range(p)])
    free = [0.0] * p
    pos = [0] * p
    remaining = sum(len(s) for s in plans)
    while remaining:
        progressed = False
        for i in range(p):
            steps, row, k = plans[i], out.rows[i], pos[i]
            while k < len(steps):
                op, chunk, j, g, table, src, linked, pieces, total = steps[k]
                arrival = 0.0
                if table is not None:
                    arrival = table[src][j]
                    if arrival < 0:
                        break
                    if linked:
                        lag = links[min(src % p, i) if abs(src % p - i) == 1 else p - 1]
                        if lag > 0:
                            out.transfers.append(Transfer(src % p, i, j, "activation" if op == "F" else "gradient",
                                                          arrival, arrival + lag))
                        arrival += lag
                start = max(free[i], arrival)
                free[i] = (f_done if op == "F" else b_done)[g][j] = start + total
                row.append(Op(i, chunk, j, op, start, start + total, pieces))
                k += 1
            if k > pos[i]:
                remaining -= k - pos[i]
                pos[i] = k
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocked")
    out.makespan = max(free)
    return out
