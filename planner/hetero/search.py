"""Search for the fastest plan on a cluster of node groups.

Space: tp (inside a node, dividing the heads) x dp (one stage = tp * dp GPUs of one group) with the stages
filling every group (pp = sum over groups of its GPUs / (tp * dp), so no GPU idles; using only part of the
cluster is what the single-group baselines below cover), x mbs, ZeRO, recompute, SP and the schedule (GPipe
or 1F1B; interleaving is left to homogeneous clusters).
Each candidate gets a lower bound on its step: with n_s blocks at b_k seconds on stage s of group k, the slowest
stage takes at least L / sum_k (stages_k / b_k) and all stages together at least L * min_k b_k, and every
schedule's step is at least (m - 1) max + sum of the per-stage times (planner.hetero.assign). Candidates are
costed in increasing order of that bound, each with the best contiguous ordering of its groups (and the exact
min-max layer split), until the bound passes the k-th best step; the best TOP_EXACT are then re-assigned by
the exact ILP (or the local search beyond its size, planner.hetero.assign), costed in full, and the faster of
the two assignments kept.
Reported against: the same configuration in naive rank order (stages on the groups as listed, layers split
evenly as a homogeneous planner would), and the best plan of the homogeneous search on each group alone.
"""

from __future__ import annotations

import heapq
import time
from itertools import combinations
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from planner.hetero.assign import Assignment, best_assignment, contiguous
from planner.hetero.cost import HeteroCore, HeteroCost
from planner.search.search import TIE_TOLERANCE
from planner.search.space import Candidate, Constraints, _pick, stage_choices
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec
from planner.validate import divisors, expert_shards, tp_shards

TOP_EXACT = 1        # candidates whose stages the ILP (or the local search) re-assigns
MAX_SUBSET_GROUPS = 4   # up to this many groups every subset is searched (2^K - 1 sets of groups)
SLACK = 1 + 1e-9


@dataclass
class PartResult:
    """The best plan of the homogeneous search on one node group alone."""

    group: str
    gpus: int
    step: float | None           # None: nothing fits on that group alone
    config: str = ""


@dataclass
class HeteroResult:
    top: list[HeteroCore]
    candidates: int
    evaluated: int
    rejected: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    naive: HeteroCore | None = None
    parts: list[PartResult] = field(default_factory=list)
    closest: HeteroCore | None = None
    cost: HeteroCost | None = None           # the cost models the plans were costed with
    every_group: HeteroCore | None = None    # when the winner leaves groups idle: the best plan on all of them


def enumerate_hetero(hc: HeteroCost, c: Constraints, rejected: Counter) -> Iterator[Candidate]:
    """Every valid configuration whose stages fill every node group the view `hc` uses (HeteroCost.using)."""
    model, training, engine = hc.model, hc.training, hc.engine
    L, B = model.num_layers, training.global_batch
    used = [hc.groups[k] for k in hc.used]
    smallest_node = min(g.gpus_per_node for g in used)
    pads = engine.memory_extras.vocab_multiple > 1
    for tp in _pick(c.tp, divisors(smallest_node)):
        if (tp_shards(model, tp) or (c.max_tp and tp > c.max_tp) or (not pads and model.vocab_size % tp)
                or (tp > 1 and c.sp and not engine.sequence_parallel)):
            rejected["indivisible"] += 1
            continue
        for dp in _pick(c.dp, divisors(B)):
            capacity = hc.capacity(tp, dp)
            pp = sum(capacity)
            eps = [e for e in _pick(c.ep, divisors(dp)) if expert_shards(model, e, dp) is None]
            if (any(capacity[g.index] * tp * dp != g.gpus for g in used) or not 1 <= pp <= L
                    or (c.pp is not None and pp != c.pp) or (c.max_pp and pp > c.max_pp) or not eps):
                rejected["indivisible"] += 1
                continue
            for mbs, schedule, vpp, zero, recompute, sp, ep in stage_choices(
                    model, training, engine, c, tp, pp, dp, eps, rejected):
                if vpp == 1:        # no interleaving on node groups; ep inside a stage's DP group, in one group
                    yield Candidate(tp, pp, dp, 1, mbs, zero, recompute, sp, schedule, ep=ep)


def group_subsets(count: int) -> list[tuple[int, ...]]:
    """The sets of groups a plan may use: every group first, then every proper non-empty subset up to
    MAX_SUBSET_GROUPS groups (beyond: every group, and each group alone)."""
    every = tuple(range(count))
    if count > MAX_SUBSET_GROUPS:
        return [every] + [(k,) for k in range(count)] if count > 1 else [every]
    return [every] + [s for r in range(count - 1, 0, -1) for s in combinations(every, r)]


def time_bound(hc: HeteroCost, cand: Candidate) -> float:
    """Seconds no assignment or layer split of `cand` can beat (see the module docstring). It depends on the
    ZeRO stage only through the compute dtypes (unless experts are sharded) and not on the schedule, so
    candidates that differ only there share one (cached on the cost models, for every view)."""
    key = (cand.tp, cand.dp, cand.mbs, cand.sp, cand.recompute, cand.ep,
           cand.zero if cand.ep > 1 else hc.costs[0].dtypes(cand.zero, cand.dp), hc.used)
    hit = hc.bounds.get(key)
    if hit is None:
        hit = hc.bounds[key] = _time_bound(hc, cand)
    return hit


def _time_bound(hc: HeteroCost, cand: Candidate) -> float:
    L, m, p = hc.model.num_layers, cand.microbatches(hc.training.global_batch), cand.pp
    capacity = hc.capacity(cand.tp, cand.dp)
    used = [k for k, n in enumerate(capacity) if n]
    blocks = {k: hc.block_seconds(cand, k) for k in used}
    first, last = hc.end_seconds(cand, used)
    host = hc.engine.host.per_microbatch_s
    rate = sum(capacity[k] / blocks[k] for k in used)
    # stage times T - e_s hold (T - e_s) / b_s blocks, all stages together L: T >= (L + sum_s e_s / b_s) / rate
    slowest = (L + min(first[k] / blocks[k] for k in used) + min(last[k] / blocks[k] for k in used)) / rate + host
    total = L * min(blocks.values()) + min(first.values()) + min(last.values()) + p * host
    ends_apart = (_fill_bound(L, m, [(blocks[k], capacity[k]) for k in used]) + (m - 1 + p) * host
                  + min(first.values()) + min(last.values()))
    return max((m - 1) * slowest + total, ends_apart)


def _fill_bound(L: int, m: int, groups: list[tuple[float, int]]) -> float:
    """min over real block counts n_s >= 0 summing to L of (m - 1) max_s n_s b_s + sum_s n_s b_s, for stages
    of (block seconds, count) groups: for a slowest-stage time M the sum is least with the fastest stages
    filled to M first, and the minimum over M lies where the first j fastest groups are exactly full."""
    groups = sorted(groups)
    best, full_rate, full_count = float("inf"), 0.0, 0
    for b, count in groups:
        full_rate += count / b
        full_count += count
        M = L / full_rate                       # the first j groups full, the others empty
        best = min(best, (m - 1) * M + full_count * M)
    return best


def search_hetero(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                  constraints: Constraints = Constraints(), top_k: int = 5, engine=None,
                  memory_headroom: float = 0.10, baselines: bool = True) -> HeteroResult:
    """The top_k fastest feasible plans whose stages fill every node group they use (every group, or a subset
    with the others idle), with their baselines."""
    start = time.perf_counter()
    hc = HeteroCost(model, cluster, training, engine, memory_headroom)
    rejected: Counter = Counter()
    queue = []
    for used in group_subsets(len(hc.groups)):
        view = hc.using(used)
        for cand in enumerate_hetero(view, constraints, rejected):
            if view.most_layers(cand) < model.num_layers:     # no assignment holds the model (cheap: no kernels)
                rejected["out_of_memory"] += 1
                continue
            queue.append((time_bound(view, cand), len(queue), cand, view))
    heapq.heapify(queue)
    count = len(queue) + rejected["out_of_memory"]
    found: list[HeteroCore] = []
    best: list[float] = []         # max-heap (negated) of the top_k steps
    closest, evaluated = None, 0
    # CBC runs in its own process: it solves the leader's assignment while the search goes on, and the
    # baselines are costed while it solves the final one
    with ThreadPoolExecutor(max_workers=1) as pool:
        exact = _Exact(pool)
        while queue:
            bound, tie, cand, view = heapq.heappop(queue)
            if len(best) == top_k and bound > -best[0] * (1 + TIE_TOLERANCE) * SLACK:
                heapq.heappush(queue, (bound, tie, cand, view))
                break
            core, closer = _cost(view, cand, rejected)
            evaluated += core is not None or closer is not None
            if closer is not None and (closest is None or max(closer.reserved) < max(closest.reserved)):
                closest = closer
            if core is None:
                continue
            if not found or core.step < min(c.step for c in found):
                exact.offer(view, core)
            found.append(core)
            if len(best) < top_k:
                heapq.heappush(best, -core.step)
            elif core.step < -best[0]:
                heapq.heapreplace(best, -core.step)
        found.sort(key=lambda c: c.step)
        every = None
        if found and found[0].used != hc.used:     # the winner leaves groups idle: what using all of them costs
            every, more = _best_on_every_group(hc, queue, found, rejected)
            evaluated += more
        rejected["dominated"] += len(queue)
        again = found[:TOP_EXACT] + ([every] if every is not None else [])
        answers = [exact.of(hc.using(core.used), core) for core in again]
        naive = naive_rank_order(hc.using(found[0].used), found[0].cand) if found else None
        parts = single_parts(hc, constraints) if baselines else []
        refined = [_refine(hc, core, a.result()) for core, a in zip(again, answers)]
    if every is not None:
        every = refined.pop()
    refined += found[TOP_EXACT:]
    top = sorted(refined, key=lambda c: c.step)[:top_k]
    return HeteroResult(top=top, candidates=count, evaluated=evaluated, rejected=rejected, naive=naive,
                        parts=parts, closest=None if top else closest, cost=hc, every_group=every,
                        seconds=time.perf_counter() - start)


class _Exact:
    """Stage assignments by the ILP (planner.hetero.assign.best_assignment), one solve at a time on `pool`:
    `offer` starts the search's new leader's when no solve is running, `of` returns a plan's, started then if
    it was not before."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.started: dict[tuple, Future] = {}
        self.running: Future | None = None

    def offer(self, view: HeteroCost, core: HeteroCore) -> None:
        if self.running is None or self.running.done():
            self.running = self.of(view, core)

    def of(self, view: HeteroCost, core: HeteroCore) -> Future:
        key = (core.cand, core.used)
        if key not in self.started:
            self.started[key] = self.pool.submit(best_assignment, view.problem(core.cand))
        return self.started[key]


def _cost(view: HeteroCost, cand: Candidate, rejected: Counter) -> tuple[HeteroCore | None, HeteroCore | None]:
    """(`cand` costed with its best contiguous assignment, None when it does not fit; the costed plan that did
    not fit, if any). Every queued candidate passed most_layers."""
    core = _contiguous_core(view, cand)
    if core is None or not core.feasible:
        rejected["out_of_memory"] += 1
        return None, core
    return core, None


def _best_on_every_group(hc: HeteroCost, queue: list, found: list[HeteroCore],
                         rejected: Counter) -> tuple[HeteroCore | None, int]:
    """The fastest plan that uses every group (None: none fits), costing the queue's candidates on every group
    in bound order until the bound passes the best found; and how many it costed."""
    every = next((core for core in found if core.used == hc.used), None)
    kept, costed = [], 0
    while queue:
        entry = heapq.heappop(queue)
        bound, _, cand, view = entry
        if view.used != hc.used:
            kept.append(entry)
            continue
        if every is not None and bound > every.step * SLACK:
            kept.append(entry)
            break
        core, closer = _cost(view, cand, rejected)
        costed += core is not None or closer is not None
        if core is not None and (every is None or core.step < every.step):
            every = core
    for entry in kept:
        heapq.heappush(queue, entry)
    return every, costed


def _contiguous_core(hc: HeteroCost, cand: Candidate) -> HeteroCore | None:
    """`cand` costed with its best contiguous assignment under every position's memory cap (None: no split
    fits). The best assignment without the caps is tried first: when it fits, it is also the best of those
    that fit (the caps only remove assignments), and the caps are not computed."""
    free = contiguous(hc.problem(cand, memory=False))
    if free is not None:
        core = hc.evaluate(cand, free.groups, free.layers, free.method)
        if core.feasible:
            return core
    capped = contiguous(hc.problem(cand))
    return None if capped is None else hc.evaluate(cand, capped.groups, capped.layers, capped.method)


def _refine(hc: HeteroCost, core: HeteroCore, exact: Assignment | None) -> HeteroCore:
    """`core` re-assigned as `exact` (the ILP's or, past its size, the local search's answer), kept if it costs
    less."""
    if exact is None:
        return core
    other = hc.evaluate(core.cand, exact.groups, exact.layers, exact.method)
    if other.feasible and other.step < core.step * (1 - 1e-9):
        return other
    if exact.groups == core.groups and exact.layers == core.layers or other.step <= core.step * (1 + 1e-9):
        core.method = f"{exact.method} (its optimum is the best contiguous order or ties with it)"
    else:
        core.method = (f"the best contiguous order: the {exact.method}'s optimum of the stage objective costs "
                       f"{other.step / core.step - 1:+.1%} in full")
    return core


def naive_rank_order(hc: HeteroCost, cand: Candidate) -> HeteroCore:
    """`cand` with stages in rank order over the groups as listed and the layers split evenly (the remainder to
    the middle stages), as a planner that sees one kind of GPU would run it."""
    groups = hc.rank_order(cand)
    base, rest = divmod(hc.model.num_layers, cand.pp)
    layers = [base] * cand.pp
    order = list(range(1, cand.pp - 1)) + [0, cand.pp - 1] if cand.pp > 2 else list(range(cand.pp))
    for s in order[:rest]:
        layers[s] += 1
    return hc.evaluate(cand, groups, layers, "naive rank order")


def single_parts(hc: HeteroCost, constraints: Constraints) -> list[PartResult]:
    """The best plan of the homogeneous search on each node group alone (None where nothing fits), and, when
    every group has the same GPUs, on the whole cluster as one fabric at its slowest link between groups
    (what a flat plan whose DP rings span the groups runs at)."""
    from planner.search.search import search
    out = []
    part = Constraints(**{**constraints.__dict__, "pp": None, "dp": None})
    for g, cost in zip(hc.groups, hc.costs):
        result = search(cost.model, g.cluster, hc.training, part, top_k=1, cost=cost)
        best = result.top[0] if result.top else None
        out.append(PartResult(g.name, g.gpus, best.step if best else None, label(best.cfg) if best else ""))
    flat = flat_cluster(hc)
    if flat is not None:
        from planner.cost.model import CostModel
        cost = CostModel(hc.model, flat, hc.training, engine=hc.engine, memory_headroom=hc.costs[0].memory_headroom)
        result = search(hc.model, flat, hc.training, part, top_k=1, cost=cost)
        best = result.top[0] if result.top else None
        out.append(PartResult("the whole cluster as one fabric at its slowest group link", flat.world_size,
                              best.step if best else None, label(best.cfg) if best else ""))
    return out


def flat_cluster(hc: HeteroCost):
    """All nodes as one homogeneous cluster whose NICs run at the slowest link between groups (per GPU), when
    every group has the same GPU type, node size and links inside; None otherwise or when no link is slower."""
    first = hc.groups[0].cluster
    if len(hc.groups) < 2 or any((g.gpu_type, g.gpus_per_node, g.cluster.intra_node, g.cluster.inter_node,
                                  g.cluster.nics_per_node) != (hc.groups[0].gpu_type, hc.groups[0].gpus_per_node,
                                                               first.intra_node, first.inter_node,
                                                               first.nics_per_node) for g in hc.groups):
        return None
    links = [hc.links.link(a, b) for a in range(len(hc.groups)) for b in range(a + 1, len(hc.groups))]
    slowest = min(links, key=lambda link: link.bandwidth)
    if slowest.bandwidth >= hc.groups[0].node_bandwidth:
        return None
    nic = slowest.model_copy(update={"bandwidth": slowest.bandwidth / first.nics_per_node,
                                     "latency": max(slowest.latency, first.inter_node.latency)})
    nodes = first.nodes.model_copy(update={"count": sum(g.nodes for g in hc.groups)})
    return first.model_copy(update={"name": f"{hc.cluster.name} (flat)", "nodes": nodes, "inter_node": nic})


def label(cand: Candidate) -> str:
    """'tp8 pp4 dp2 mbs1 z1 full sp 1f1b' for a candidate."""
    from planner.specs import ParallelConfig
    return ParallelConfig(tp=cand.tp, pp=cand.pp, dp=cand.dp, vpp=cand.vpp, mbs=cand.mbs, zero=cand.zero,
                          recompute=cand.recompute, sp=cand.sp, schedule=cand.schedule, ep=cand.ep).short()
