"""A discrete-event simulation of one step's pipeline schedule: GPipe, 1F1B and interleaved 1F1B.

The reference for planner/cost/pipeline.py's closed forms (tests/test_pipeline_schedule.py) and the source of
the pipeline timeline `meshplan report` draws. Each device runs its operations in the schedule's order
(Megatron-LM's orders); an operation starts when its device is free and the operation it depends on (the
previous virtual stage's forward, the next virtual stage's backward) has finished and its activation or
gradient has crossed the link. A transfer is a link delay of `p2p` seconds, not busy device time: the device
that sends goes on with its next operation (the closed forms, by contrast, charge every transfer to the
device's cycle, so they sit above this simulation by at most the transfers they charge).

An operation's work is either plain seconds or a sequence of (kind, seconds) pieces run back to back (e.g.
recompute, then backward, then the TP collectives), so the timeline can show what the device is doing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Piece = tuple[str, float]          # (kind, seconds)
Work = float | Sequence[Piece]     # one micro-batch's forward or backward of one chunk on one device


@dataclass(frozen=True)
class Event:
    """One piece of one operation: `device` is busy from `start` to `end` (seconds from the step's start)."""

    device: int
    chunk: int         # local model chunk (virtual stage chunk * pp + device)
    microbatch: int
    op: str            # "F" (forward) or "B" (backward)
    kind: str          # what the piece does: forward, backward, recompute, communication, ...
    start: float
    end: float


@dataclass(frozen=True)
class Transfer:
    """An activation (forward) or gradient (backward) crossing the link between two devices."""

    src: int
    dst: int
    microbatch: int
    what: str          # "activation" or "gradient"
    start: float
    end: float


@dataclass
class Timeline:
    """Every device's events in execution order, every transfer, and the makespan (seconds)."""

    devices: int
    events: list[Event] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    makespan: float = 0.0

    def busy(self, device: int) -> dict[str, float]:
        """Seconds `device` spends on each kind of work."""
        out: dict[str, float] = {}
        for e in self.events:
            if e.device == device:
                out[e.kind] = out.get(e.kind, 0.0) + (e.end - e.start)
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


def _pieces(work: Work, kind: str) -> list[Piece]:
    if isinstance(work, (int, float)):
        return [(kind, float(work))]
    return [(k, float(s)) for k, s in work]


def simulate(schedule: str, m: int, fwd: Sequence[Sequence[Work]], bwd: Sequence[Sequence[Work]],
             p2p: float = 0.0) -> Timeline:
    """Run one step of `m` micro-batches. fwd[i][c] / bwd[i][c]: one micro-batch's forward / backward of local
    chunk c on device i (seconds, or (kind, seconds) pieces); `p2p`: seconds an activation or gradient takes
    between neighbouring devices."""
    p, v = len(fwd), len(fwd[0])
    stages = p * v
    lag = p2p if p > 1 else 0.0
    work = {("F", i, c): _pieces(fwd[i][c], "forward") for i in range(p) for c in range(v)}
    work.update({("B", i, c): _pieces(bwd[i][c], "backward") for i in range(p) for c in range(v)})
    orders = [device_order(schedule, p, v, m, i) for i in range(p)]
    done: dict[tuple[str, int, int], float] = {}   # (op, virtual stage, micro-batch) -> finish time
    out = Timeline(devices=p)
    free = [0.0] * p
    pos = [0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            order = orders[i]
            while pos[i] < len(order):
                op, chunk, j = order[pos[i]]
                g = chunk * p + i
                if op == "F":
                    src = g - 1 if g > 0 else None
                    dep = done.get(("F", src, j)) if src is not None else 0.0
                else:
                    src = g + 1 if g < stages - 1 else None
                    dep = done.get(("B", src, j)) if src is not None else done.get(("F", g, j))
                if dep is None:
                    break
                arrival = dep
                if src is not None and src % p != i:     # crosses a link (not a chunk handed on locally)
                    arrival = dep + lag
                    if lag > 0:
                        out.transfers.append(Transfer(src % p, i, j, "activation" if op == "F" else "gradient",
                                                      dep, arrival))
                t = max(free[i], arrival)
                for kind, seconds in work[(op, i, chunk)]:
                    if seconds > 0:
                        out.events.append(Event(i, chunk, j, op, kind, t, t + seconds))
                        t += seconds
                free[i] = done[(op, g, j)] = t
                pos[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocked")
    out.makespan = max(free)
    return out
