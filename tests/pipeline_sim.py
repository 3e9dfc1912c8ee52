"""A discrete-event simulator of pipeline schedules: the brute-force reference for planner/cost/pipeline.py.

Each device runs its operations in the schedule's order; an operation starts when its device is free and
the operation it depends on (previous virtual stage's forward, next virtual stage's backward) has finished
and its activation or gradient has arrived (p2p seconds later).
"""

from __future__ import annotations


def device_order(schedule: str, p: int, v: int, m: int, device: int) -> list[tuple[str, int, int]]:
    """(kind, chunk, micro-batch) in execution order on one device (Megatron-LM's orders)."""
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


def simulate(schedule: str, m: int, fwd: list[list[float]], bwd: list[list[float]], p2p: float) -> float:
    """Makespan. fwd[i][c] / bwd[i][c]: one micro-batch's time of chunk c on device i."""
    p, v = len(fwd), len(fwd[0])
    stages = p * v
    orders = [device_order(schedule, p, v, m, i) for i in range(p)]
    done: dict[tuple[str, int, int], float] = {}   # (kind, virtual stage, micro-batch) -> finish time
    free = [0.0] * p
    pos = [0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            while pos[i] < len(orders[i]):
                kind, chunk, j = orders[i][pos[i]]
                g = chunk * p + i
                if kind == "F":
                    dep = done.get(("F", g - 1, j)) if g > 0 else 0.0
                    lag = p2p if g > 0 else 0.0
                    length = fwd[i][chunk]
                else:
                    dep = done.get(("B", g + 1, j)) if g < stages - 1 else done.get(("F", g, j))
                    lag = p2p if g < stages - 1 else 0.0
                    length = bwd[i][chunk]
                if dep is None:
                    break
                start = max(free[i], dep + lag)
                free[i] = done[(kind, g, j)] = start + length
                pos[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocked")
    return max(free)
