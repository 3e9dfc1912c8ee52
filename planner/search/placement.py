"""Place ranks on devices when links are measured: a swap local search over the naive placement.

With spec-sheet links every node is alike, so only the rank order (which axis sits next to TP) matters and
the main search covers it. With a measured link matrix some pairs are slower: moving whole nodes (or single
GPUs on a one-node cluster) changes which groups and pipeline neighbours use them. Starting from rank r on
device r, the search swaps two units whenever that lowers the predicted step time, until no swap helps or
the evaluation budget is spent; the result is never slower than the naive placement it reports against.
"""

from __future__ import annotations

from planner.cost.model import Core, CostModel
from planner.search.space import Candidate

MAX_EVALUATIONS = 2000


def improve_placement(cost: CostModel, cand: Candidate, naive: Core,
                      max_evaluations: int = MAX_EVALUATIONS) -> Core:
    """The best placement found for `cand` (its Core carries `devices`), or `naive` if none is faster."""
    gpus, per_node = cost.cluster.world_size, cost.cluster.gpus_per_node
    unit = per_node if cost.cluster.num_nodes > 1 else 1
    order = list(range(gpus // unit))

    def devices() -> tuple[int, ...]:
        return tuple(order[r // unit] * unit + r % unit for r in range(gpus))

    best, evaluations, improved = naive, 0, True
    while improved and evaluations < max_evaluations:
        improved = False
        for i in range(len(order)):
            for j in range(i + 1, len(order)):
                if evaluations >= max_evaluations:
                    break
                order[i], order[j] = order[j], order[i]
                core = cost.evaluate_core(cand, cand.order, devices())
                evaluations += 1
                if core.feasible and core.step < best.step * (1 - 1e-9):
                    best, improved = core, True
                else:
                    order[i], order[j] = order[j], order[i]
    return best
