"""Place ranks on devices when links are measured: a swap local search over the naive placement.

With spec-sheet links every node is alike, so only the rank order (which axis sits next to TP) matters and
the main search covers it. With a measured link matrix some pairs are slower: moving whole nodes (or single
GPUs on a one-node cluster) changes which groups and pipeline neighbours use them. Starting from rank r on
device r, the search swaps two units whenever that lowers the predicted step time, until no swap helps or
the evaluation budget is spent; the result is never slower than the naive placement it reports against.
Only placements `meshplan run` can run are tried: every TP, DP and expert-DP group on increasing devices
(planner.layout.reversed_group); a swap that reverses a group has that group's devices put back in order.
"""

from __future__ import annotations

from planner.cost.model import Core, CostModel
from planner.layout import reversed_group
from planner.parallel_dims import ParallelDims
from planner.search.space import Candidate

MAX_EVALUATIONS = 2000


def improve_placement(cost: CostModel, cand: Candidate, naive: Core,
                      max_evaluations: int = MAX_EVALUATIONS) -> Core:
    """The best placement found for `cand` (its Core carries `devices`), or `naive` if none is faster."""
    gpus, per_node = cost.cluster.world_size, cost.cluster.gpus_per_node
    unit = per_node if cost.cluster.num_nodes > 1 else 1
    units = gpus // unit
    dims = ParallelDims.of(cand, cand.order)

    def swapped(placed: tuple[int, ...], i: int, j: int) -> tuple[int, ...] | None:
        """`placed` with rank blocks i and j (a node's worth, or one rank) exchanging devices, then each group
        the runtime cannot run (devices decreasing along it) given its devices in increasing order; None if that
        does not settle."""
        out = list(placed)
        a, b = slice(i * unit, (i + 1) * unit), slice(j * unit, (j + 1) * unit)
        out[a], out[b] = placed[b], placed[a]
        for _ in range(gpus):
            bad = reversed_group(dims, out)
            if bad is None:
                return tuple(out)
            group = bad[1]
            for r, d in zip(group, sorted(out[r] for r in group)):
                out[r] = d
        return None

    best, evaluations, improved = naive, 0, True
    current = tuple(range(gpus))
    while improved and evaluations < max_evaluations:
        improved = False
        for i in range(units):
            for j in range(i + 1, units):
                if evaluations >= max_evaluations:
                    break
                placed = swapped(current, i, j)
                if placed is None:
                    continue
                core = cost.evaluate_core(cand, cand.order, placed)
                evaluations += 1
                if core.feasible and core.step < best.step * (1 - 1e-9):
                    best, improved, current = core, True, placed
    return best
