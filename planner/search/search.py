"""Exact best-first search over the parallel configurations of `space.py`, costed by `planner.cost`.

Branch and bound: every candidate gets a lower bound on its step time and on its memory (CostModel.bounds)
at the cost of a few dictionary look-ups; candidates whose memory bound already exceeds the GPU are out of
memory, the rest are costed in increasing order of their time bound, and the search stops when the next
bound exceeds the k-th best step time found (nothing after it can enter the top k). The result is the top k
of an exhaustive enumeration under the same cost model (tests check exactly that).
Ranking: step time, ties broken by lower peak memory. With a measured link matrix, the top k are then placed
on devices by `placement.py` (a local search, reported against the naive placement) and re-ranked.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from planner.cost.model import Core, CostModel
from planner.layout import DEFAULT_ORDER
from planner.search.placement import improve_placement
from planner.search.space import Candidate, Constraints, enumerate_space
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

SLACK = 1 + 1e-9     # bounds and costs add the same terms in different orders: allow for rounding


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


def rank_key(core: Core) -> tuple[float, float]:
    """Step time, then peak memory; rounded so that configurations the cost model prices alike through
    different sums of the same terms tie exactly (and enumeration order breaks the tie)."""
    return round(core.step, 12), round(core.peak_reserved)


def search(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, constraints: Constraints = Constraints(),
           top_k: int = 5, compare: Candidate | None = None, cost: CostModel | None = None,
           progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """The top_k fastest feasible configurations. `progress(done, total)` is called while costing."""
    start = time.perf_counter()
    cost = cost or CostModel(model, cluster, training)
    rejected: Counter = Counter()
    usable = cost.usable_bytes
    queue: list[tuple[float, int, Candidate]] = []
    closest_lb: tuple[float, int, Candidate] | None = None
    count = 0
    for cand in enumerate_space(cost.model, cluster, training, constraints, rejected, cost.engine):
        if cand.order != DEFAULT_ORDER and (cost.placement_signature(cand.tp, cand.pp, cand.dp, cand.order)
                                            == cost.placement_signature(cand.tp, cand.pp, cand.dp, DEFAULT_ORDER)):
            rejected["dominated"] += 1     # this rank order places every group as the default one does
            continue
        count += 1
        mem_lb = cost.memory_bound(cand)
        if mem_lb > usable * SLACK:
            rejected["out_of_memory"] += 1
            if closest_lb is None or mem_lb < closest_lb[0]:
                closest_lb = (mem_lb, count, cand)
            continue
        queue.append((cost.time_bound(cand, cand.order), count, cand))
    heapq.heapify(queue)
    total = len(queue)

    compare_core = cost.evaluate_core(compare, compare.order) if compare is not None else None
    threshold_extra = compare_core.step if compare_core is not None else 0.0
    top: list[tuple[tuple[float, float], int, Core]] = []     # max-heap by negated key, size <= top_k
    faster_than_compare = 0
    seen: set = set()
    closest: Core | None = None
    evaluated = 0
    while queue:
        time_lb, tie, cand = queue[0]
        kth = -top[0][0][0] if len(top) == top_k else float("inf")
        if time_lb > max(kth, threshold_extra) * SLACK:
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
        key = rank_key(core)
        twin = (cand._replace(order=DEFAULT_ORDER), key)
        if twin in seen:               # another rank order of the same config, costed the same: no news
            rejected["dominated"] += 1
            continue
        seen.add(twin)
        if len(top) < top_k:
            heapq.heappush(top, ((-key[0], -key[1]), -tie, core))
        elif (key, tie) < ((-top[0][0][0], -top[0][0][1]), -top[0][1]):
            heapq.heapreplace(top, ((-key[0], -key[1]), -tie, core))
    rejected["dominated"] += len(queue)
    ranked = [entry[2] for entry in sorted(top, key=lambda e: (-e[0][0], -e[0][1], -e[1]))]
    naive_step = ranked[0].step if ranked else None
    if cost.net.matrix is not None and ranked:
        ranked = sorted((improve_placement(cost, core.cfg, core) for core in ranked), key=rank_key)
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
