"""Stages to node groups and layers to stages: an exact ILP (pulp + CBC) and a local search beyond its size.

A pipeline of p stages, each on one node group (one GPU type); stage s on group k costs, per micro-batch,
  D_s = n_s * block[k] + extra[s][k] + hop[k_prev][k] + hop[k][k_next]
(n_s blocks of one block's forward + backward on that GPU type; the embedding on s = 0, the head and loss on s =
p - 1 and the host's time per micro-batch in `extra`; each transfer to and from a neighbour blocks the stage
once, or, sent asynchronously, bounds the two neighbours' steady-state loop: (D_s + D_s+1) / 2 + c). The step is
the 1F1B closed form over m micro-batches (Narayanan et al. SC21 Sec. 2.2, with Pipette's slowest-stage steady
state): (m - 1) max_s D_s + sum_s D_s. Constraints: every stage on one group, at most capacity[k] stages on group
k (its GPUs over one stage's), n_s between 1 and caps[s][k] (what stage position s can hold in group k's memory:
1F1B position s keeps p - s micro-batches in flight) and the n_s summing to the model's layers.

The ILP linearises the stage-to-group choice with binaries x[s,k], the layers with integers n[s,k] <= caps x,
the neighbour pairs with y[s,k,k'] >= x[s,k] + x[s+1,k'] - 1 (their cost is positive, so y is the product at
the optimum) and the max with T >= D_s; `brute_force` enumerates every assignment and split (tests check
both are equal). Beyond ILP_MAX_BINARIES binaries (CBC answers those in well under a second) or when CBC
does not prove optimality within ILP_SECONDS, `local_search` improves the best contiguous ordering by moving and
swapping stages, with the exact min-max layer split (planner.partition) for each assignment.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import permutations, product

from planner.partition import partition_layers

# stages x groups the ILP takes: 8 stages on two groups, 4 on four. CBC proves those optimal in under a second
# here (Llama-3-70B on 1,024 mixed GPUs: 0.5-0.9 s at 8 stages) but not 16 stages on two groups in 30 s.
ILP_MAX_BINARIES = 16
ILP_SECONDS = 2.0            # CBC's CPU-time limit; past it the local search's answer stands


@dataclass(frozen=True)
class StageProblem:
    """One configuration's stage costs on each group (seconds per micro-batch; caps in blocks)."""

    layers: int
    microbatches: int
    block: list[float]             # [k]
    extra: list[list[float]]       # [s][k]
    caps: list[list[int]]          # [s][k]: the most blocks position s holds on group k (0: not even one)
    hop: list[list[float]]         # [k][k']: one transfer from a stage on k to the next stage on k'
    capacity: list[int]            # [k]: stages group k can host

    @property
    def stages(self) -> int:
        return len(self.extra)

    @property
    def groups(self) -> int:
        return len(self.block)

    def stage_times(self, groups: tuple[int, ...], layers: list[int]) -> list[float]:
        p = self.stages
        out = []
        for s, (k, n) in enumerate(zip(groups, layers)):
            d = n * self.block[k] + self.extra[s][k]
            if s > 0:
                d += self.hop[groups[s - 1]][k]
            if s < p - 1:
                d += self.hop[k][groups[s + 1]]
            out.append(d)
        return out

    def objective(self, groups: tuple[int, ...], layers: list[int]) -> float:
        """(m - 1) max D + sum D: the 1F1B makespan of this assignment and split."""
        d = self.stage_times(groups, layers)
        return (self.microbatches - 1) * max(d) + sum(d)

    def fits(self, groups: tuple[int, ...]) -> bool:
        """Every group within its capacity and every position able to hold a block there."""
        return (all(groups.count(k) <= c for k, c in enumerate(self.capacity))
                and all(self.caps[s][k] >= 1 for s, k in enumerate(groups)))

    def split(self, groups: tuple[int, ...]) -> list[int] | None:
        """The min-max layer split of an assignment (exact, planner.partition), with the transfers as fixed
        time; None when the layers do not fit."""
        if not self.fits(groups):
            return None
        p = self.stages
        extra = [self.extra[s][k] + (self.hop[groups[s - 1]][k] if s > 0 else 0.0)
                 + (self.hop[k][groups[s + 1]] if s < p - 1 else 0.0) for s, k in enumerate(groups)]
        return partition_layers(self.layers, [self.block[k] for k in groups], extra,
                                caps=[self.caps[s][k] for s, k in enumerate(groups)])


@dataclass(frozen=True)
class Assignment:
    groups: tuple[int, ...]       # group of each stage
    layers: list[int]             # blocks of each stage
    objective: float
    method: str                   # "ilp" (proven optimal), "local search", "contiguous", "brute force"


def _scored(problem: StageProblem, groups: tuple[int, ...], method: str) -> Assignment | None:
    layers = problem.split(groups)
    if layers is None:
        return None
    return Assignment(groups, layers, problem.objective(groups, layers), method)


def contiguous(problem: StageProblem) -> Assignment | None:
    """The best assignment that keeps each group's stages together, over every order of the groups and every
    stage count per group (what a Metis-style enumeration of device-group orderings covers)."""
    best = None
    p, K = problem.stages, problem.groups
    for counts in _counts(p, problem.capacity):
        used = [k for k in range(K) if counts[k]]
        for order in permutations(used):
            groups = tuple(k for k in order for _ in range(counts[k]))
            a = _scored(problem, groups, "contiguous")
            if a is not None and (best is None or a.objective < best.objective):
                best = a
    return best


def _counts(p: int, capacity: list[int]):
    """Every vector of stages per group summing to p within the capacities."""
    def rec(k: int, left: int):
        if k == len(capacity) - 1:
            if left <= capacity[k]:
                yield (left,)
            return
        for c in range(min(left, capacity[k]) + 1):
            for rest in rec(k + 1, left - c):
                yield (c,) + rest
    yield from rec(0, p)


def local_search(problem: StageProblem, start: Assignment | None = None, max_rounds: int = 50) -> Assignment | None:
    """From `start` (default: the best contiguous assignment), swap the groups of two stages or move a stage to
    another group with room while that lowers the objective."""
    best = start or contiguous(problem)
    if best is None:
        return None
    p, K = problem.stages, problem.groups
    for _ in range(max_rounds):
        improved = False
        groups = list(best.groups)
        for i in range(p):
            for j in list(range(i + 1, p)) + [None]:
                options = ([(j, None)] if j is not None else [(None, k) for k in range(K) if k != groups[i]])
                for jj, k in options:
                    trial = list(groups)
                    if jj is not None:
                        if trial[i] == trial[jj]:
                            continue
                        trial[i], trial[jj] = trial[jj], trial[i]
                    else:
                        trial[i] = k
                    a = _scored(problem, tuple(trial), "local search")
                    if a is not None and a.objective < best.objective * (1 - 1e-12):
                        best, groups, improved = a, list(a.groups), True
        if not improved:
            break
    return Assignment(best.groups, best.layers, best.objective, "local search")


def brute_force(problem: StageProblem) -> Assignment | None:
    """Every assignment of stages to groups and every split of the layers (small instances only)."""
    best = None
    p, L = problem.stages, problem.layers
    for groups in product(range(problem.groups), repeat=p):
        if not problem.fits(groups):
            continue
        for split in product(*(range(1, min(L, problem.caps[s][k]) + 1) for s, k in enumerate(groups))):
            if sum(split) != L:
                continue
            value = problem.objective(groups, list(split))
            if best is None or value < best.objective:
                best = Assignment(groups, list(split), value, "brute force")
    return best


def solve_ilp(problem: StageProblem, seconds: float = ILP_SECONDS,
              start: Assignment | None = None) -> Assignment | None:
    """The optimum by pulp + CBC (warm-started from `start`); None when infeasible or not proven optimal within
    `seconds`."""
    import pulp

    p, K, L = problem.stages, problem.groups, problem.layers
    allowed = [[problem.caps[s][k] >= 1 and problem.capacity[k] >= 1 for k in range(K)] for s in range(p)]
    if any(not any(row) for row in allowed):
        return None
    lp = pulp.LpProblem("stages", pulp.LpMinimize)
    x = {(s, k): lp.add_variable(f"x_{s}_{k}", cat="Binary") for s in range(p) for k in range(K) if allowed[s][k]}
    n = {(s, k): lp.add_variable(f"n_{s}_{k}", 0, min(L, problem.caps[s][k]), "Integer")
         for (s, k) in x}
    y = {(s, a, b): lp.add_variable(f"y_{s}_{a}_{b}", 0, 1)
         for s in range(p - 1) for a in range(K) for b in range(K)
         if (s, a) in x and (s + 1, b) in x and problem.hop[a][b] > 0}
    T = lp.add_variable("T", 0)
    durations = []
    for s in range(p):
        d = pulp.lpSum(problem.block[k] * n[s, k] + problem.extra[s][k] * x[s, k] for k in range(K) if (s, k) in x)
        d += pulp.lpSum(problem.hop[a][b] * v for (t, a, b), v in y.items() if t in (s, s - 1))
        durations.append(d)
        lp += T >= d
        lp += pulp.lpSum(x[s, k] for k in range(K) if (s, k) in x) == 1
    for (s, k), xv in x.items():
        lp += n[s, k] <= min(L, problem.caps[s][k]) * xv
        lp += n[s, k] >= xv
    for (s, a, b), v in y.items():
        lp += v >= x[s, a] + x[s + 1, b] - 1
    full = sum(problem.capacity) == p          # every group's room used: the counts are fixed, a tighter model
    for k in range(K):
        used = pulp.lpSum(x[s, k] for s in range(p) if (s, k) in x)
        lp += (used == problem.capacity[k]) if full else (used <= problem.capacity[k])
    lp += pulp.lpSum(n.values()) == L
    lp += (problem.microbatches - 1) * T + pulp.lpSum(durations)
    if start is not None:          # CBC starts from this incumbent: only the proof of optimality is left
        for (s, k), xv in x.items():
            on = start.groups[s] == k
            xv.setInitialValue(1 if on else 0)
            n[s, k].setInitialValue(start.layers[s] if on else 0)
        for (s, a, b), v in y.items():
            v.setInitialValue(1 if (start.groups[s], start.groups[s + 1]) == (a, b) else 0)
        T.setInitialValue(max(problem.stage_times(start.groups, start.layers)))
    with warnings.catch_warnings():      # pulp 3.3 announces a rename for 4.0; CBC still ships inside it
        warnings.simplefilter("ignore", DeprecationWarning)
        # CPU time, not wall time: the answer must not depend on how busy the machine is
        status = lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=seconds, timeMode="cpu",
                                            warmStart=start is not None))
    if pulp.LpStatus[status] != "Optimal" or lp.sol_status != pulp.LpSolutionOptimal:
        return None
    groups = tuple(next(k for k in range(K) if (s, k) in x and x[s, k].value() > 0.5) for s in range(p))
    layers = [int(round(n[s, groups[s]].value())) for s in range(p)]
    return Assignment(groups, layers, problem.objective(groups, layers), "ilp")


def best_assignment(problem: StageProblem) -> Assignment | None:
    """The ILP's optimum when the instance is within its size (and CBC proves it), else the local search's."""
    start = contiguous(problem)
    if problem.stages * problem.groups <= ILP_MAX_BINARIES:
        found = solve_ilp(problem)
        if found is not None:
            return found
    return local_search(problem, start) if start is not None else None
