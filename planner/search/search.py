"""Exact best-first search over the parallel configurations of `space.py`, costed by `planner.cost`.

Branch and bound: every candidate gets a lower bound on its step time and on its memory (CostModel.bounds)
at the cost of a few dictionary look-ups; candidates whose memory bound already exceeds the memory budget are
out of memory, the rest are costed in increasing order of their time bound, and the search stops when the
next bound exceeds (1 + TIE_TOLERANCE) times the k-th best step time found (nothing after it can enter the top
k). The result is the top k of an exhaustive enumeration under the same cost model and ranking rule (tests
check exactly that).
Ranking (`rank`): step times within TIE_TOLERANCE of each other tie, and a tie goes to the configuration with
the most memory headroom: the first is, of all configurations within 1% of the fastest, the one reserving the
least memory; the second the same among the rest, and so on. With a measured link matrix, the top k are
then placed on devices by `placement.py` (a local search, reported against the naive placement) and
re-ranked.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from planner.cost.model import Core, CostModel
from planner.parallel_dims import DEFAULT_ORDER, ParallelDims
from planner.search.gc_pause import gc_paused
from planner.search.placement import improve_placement
from planner.search.space import Candidate, Constraints, enumerate_space
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

SLACK = 1 + 1e-9     # bounds and costs add the same terms in different orders: allow for rounding
# Predicted step times within 1% are a tie: below what a measured run resolves (step-to-step variation of
# real runs is about 1%) and far below the cost model's own error (6.7% MAPE on the vTrain runs).
TIE_TOLERANCE = 0.01


@dataclass
class SearchResult:
    top: list[Core]                          # best first
    closest: Core | None                     # the infeasible candidate nearest to fitting, when none fits
    candidates: int                          # distinct valid candidates enumerated
    evaluated: int                           # fully costed
    rejected: Counter = field(default_factory=Counter)   # out_of_memory, indivisible, dominated
    seconds: float = 0.0
    compare: Core | None = None              # the user's configuration, costed
    compare_rank: int | None = None          # 1 + feasible candidates strictly faster than it
    naive_step: float | None = None          # the winner's step with rank r on device r (before placement)


def rank(entries: list[tuple[Core, int]], k: int, tolerance: float = TIE_TOLERANCE) -> list[Core]:
    """The best k of (core, enumeration index) pairs under the ranking rule: repeatedly, among the remaining
    configurations whose step time is within `tolerance` of the fastest remaining one, the one that reserves
    the least memory (the most headroom), then the faster, then the first enumerated."""
    rest = sorted(entries, key=lambda e: (e[0].step, e[1]))
    out: list[Core] = []
    while rest and len(out) < k:
        limit = rest[0][0].step * (1 + tolerance)
        ties = [e for e in rest if e[0].step <= limit]            # a prefix of `rest`
        pick = min(ties, key=lambda e: (e[0].peak_reserved, e[0].step, e[1]))
        rest.remove(pick)
        out.append(pick[0])
    return out


def search(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, constraints: Constraints = Constraints(),
           top_k: int = 5, compare: Candidate | None = None, cost: CostModel | None = None,
           progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """The top_k fastest feasible configurations. `progress(done, total)` is called while costing."""
    with gc_paused():
        return _search(model, cluster, training, constraints, top_k, compare, cost, progress)


def _search(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, constraints: Constraints, top_k: int,
            compare: Candidate | None, cost: CostModel | None,
            progress: Callable[[int, int], None] | None) -> SearchResult:
    start = time.perf_counter()
    cost = cost or CostModel(model, cluster, training)
    rejected: Counter = Counter()
    budget = cost.budget_bytes
    queue: list[tuple[float, int, Candidate]] = []
    closest_lb: tuple[float, int, Candidate] | None = None
    count = 0
    for cand in enumerate_space(cost.model, cluster, training, constraints, rejected, cost.engine):
        if cand.order != DEFAULT_ORDER and (
                cost.placement_signature(cand.dims)
                == cost.placement_signature(ParallelDims.of(cand, DEFAULT_ORDER))):
            rejected["dominated"] += 1     # this rank order places every group as the default one does
            continue
        count += 1
        mem_lb = cost.memory_bound(cand)
        if mem_lb > budget * SLACK:
            rejected["out_of_memory"] += 1
            if closest_lb is None or mem_lb < closest_lb[0]:
                closest_lb = (mem_lb, count, cand)
            continue
        queue.append((cost.time_bound(cand, cand.order), count, cand))
    heapq.heapify(queue)
    total = len(queue)

    compare_core = cost.evaluate_core(compare, compare.order) if compare is not None else None
    threshold_extra = compare_core.step if compare_core is not None else 0.0
    found: list[tuple[Core, int]] = []          # every feasible, distinct configuration costed
    best_steps: list[float] = []                # max-heap (negated) of the top_k smallest step times found
    faster_than_compare = 0
    seen: set = set()
    closest: Core | None = None
    evaluated = 0
    while queue:
        time_lb, tie, cand = queue[0]
        kth = -best_steps[0] if len(best_steps) == top_k else float("inf")
        if time_lb > max(kth * (1 + TIE_TOLERANCE), threshold_extra) * SLACK:
            break
        heapq.heappop(queue)
        core = cost.evaluate_core(cand, cand.order)
        evaluated += 1
        if progress and evaluated % 64 == 0:
            progress(evaluated, total)
        if not core.feasible:
            rejected["out_of_memory"] += 1
            if closest is None or core.peak_reserved < closest.peak_reserved:
                closest = core
            continue
        if compare_core is not None and core.step < compare_core.step:
            faster_than_compare += 1
        twin = (cand._replace(order=DEFAULT_ORDER), (core.step, core.peak_reserved))
        if twin in seen:               # another rank order of the same config, costed the same: no news
            rejected["dominated"] += 1
            continue
        seen.add(twin)
        found.append((core, tie))
        if len(best_steps) < top_k:
            heapq.heappush(best_steps, -core.step)
        elif core.step < -best_steps[0]:
            heapq.heapreplace(best_steps, -core.step)
    rejected["dominated"] += len(queue)
    ranked = rank(found, top_k)
    naive_step = ranked[0].step if ranked else None
    if cost.net.matrix is not None and ranked:
        ranked = rank([(improve_placement(cost, core.cfg, core), i) for i, core in enumerate(ranked)], top_k)
    if not ranked and closest_lb is not None:
        lb_core = cost.evaluate_core(closest_lb[2], closest_lb[2].order)
        if closest is None or lb_core.peak_reserved < closest.peak_reserved:
            closest = lb_core
    if progress:
        progress(total, total)
    return SearchResult(top=ranked, closest=None if ranked else closest, candidates=count, evaluated=evaluated,
                        rejected=rejected, seconds=time.perf_counter() - start, compare=compare_core,
                        compare_rank=(faster_than_compare + 1) if compare_core is not None else None,
                        naive_step=naive_step)
