"""The cost of a pipeline whose stages run on different node groups.

Structure of a heterogeneous plan: one pipeline of p stages replicated dp times. Every stage is tp * dp GPUs of
ONE node group (one GPU type, one network): TP inside a node, the stage's DP group inside the group, so data
parallelism never crosses groups; every replica spans the same groups in the same order and takes the same
micro-batches (no uneven batches per replica). Only pipeline transfers (and the tied embedding's gradient
sync between the first and last stage) cross groups.

Each stage is priced by its group's homogeneous CostModel (planner.cost.model): its blocks, embedding or head,
DP communication against the compute it overlaps, memory timeline at its pipeline position and optimizer
step, all on that GPU type; the pipeline transfers on the link between the two stages' GPUs
(planner.hetero.groups); the step from the per-stage times by planner.cost.step, the homogeneous model's own
function, with each hop's own transfer time (a pipeline that crosses a slow link between groups once pays it on
one hop, not on all: pipeline.pipeline_time's per-link forms). On a one-group cluster whose hops are alike
this is the homogeneous model's number (tests check it).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from planner.cost.comm import Group
from planner.cost.model import MEMORY_HEADROOM, CostModel, StageMem
from planner.cost.step import DeviceWork, step_times
from planner.engine import EngineSpec
from planner.hetero.assign import StageProblem
from planner.hetero.groups import GroupLinks, PlacedGroup, node_groups
from planner.parallel_dims import DEFAULT_ORDER, ParallelDims
from planner.search.space import Candidate
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec


class StageParts(NamedTuple):
    """What one stage of a configuration is on one group: its cost model and the pieces it prices."""

    cost: CostModel
    blk: object                  # BlockCost (the mean block, with EP all-to-alls on its group's links)
    ends: object                 # EndsCost
    dt: object                   # Dtypes
    tp_group: Group
    dp_group: Group
    edp_group: Group             # expert-data-parallel group (dp / ep ranks) of the routed experts
    ep_group: Group


@dataclass
class HeteroCore:
    """One configuration with its stages placed: plain numbers (seconds, bytes)."""

    cand: Candidate
    groups: tuple[int, ...]          # node group of each stage
    layers: list[int]                # blocks of each stage
    nmb: int
    step: float
    crit: int
    time: dict[str, float]
    stages: list[StageMem]
    reserved: list[float]            # each stage's peak reserved bytes
    budgets: list[float]             # each stage's GPU's memory budget
    feasible: bool
    devices: tuple[int, ...]         # global device of each rank (rank = pp * dp * tp + dp * tp + tp)
    p2p: float                       # the slowest hop's transfer (seconds)
    method: str = ""                 # how the stages were assigned (planner.hetero.assign)

    @property
    def used(self) -> tuple[int, ...]:
        """The groups the plan runs on (it fills each of them; the others idle)."""
        return tuple(sorted(set(self.groups)))

    @property
    def fullest(self) -> int:
        """The stage closest to its budget."""
        return max(range(len(self.stages)), key=lambda s: self.reserved[s] / self.budgets[s])


class HeteroCost:
    """Costs of configurations on a cluster of node groups, each group priced by its own CostModel."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                 engine: EngineSpec | None = None, memory_headroom: float = MEMORY_HEADROOM):
        self.cluster, self.training = cluster, training
        self.groups: list[PlacedGroup] = node_groups(cluster)
        self.costs = [CostModel(model, g.cluster, training, engine=engine, memory_headroom=memory_headroom)
                      for g in self.groups]
        self.model, self.engine = self.costs[0].model, self.costs[0].engine
        self.links = GroupLinks(cluster, self.groups)
        self.used: tuple[int, ...] = tuple(range(len(self.groups)))    # the groups stages may run on
        self._stage_cache: dict[tuple, tuple] = {}
        self._block_seconds: dict[tuple, float] = {}
        self._end_seconds: dict[tuple, tuple[float, float]] = {}
        self._held: dict[tuple, list[tuple[int, int]]] = {}
        self.bounds: dict[tuple, float] = {}     # the search's lower bounds (planner.hetero.search.time_bound)

    def using(self, used: tuple[int, ...]) -> "HeteroCost":
        """The same cost models and caches with stages allowed on the groups `used` only (the others idle)."""
        view = copy.copy(self)
        view.used = tuple(sorted(used))
        return view

    # ------------------------------------------------------------------ what a stage is on each group
    def capacity(self, tp: int, dp: int) -> list[int]:
        """Stages of tp * dp GPUs each group holds (0 where TP would leave a node or stages do not pack nodes,
        and on the groups left idle)."""
        size = tp * dp
        out = []
        for g in self.groups:
            packs = size % g.gpus_per_node == 0 or g.gpus_per_node % size == 0
            out.append(g.gpus // size if tp <= g.gpus_per_node and packs and g.index in self.used else 0)
        return out

    def _on_group(self, cand: Candidate, k: int) -> StageParts:
        """One stage of `cand` on group k: its TP, DP, EP and expert-DP groups are those of a one-stage layout of
        its tp * dp GPUs inside the group."""
        key = (cand.tp, cand.dp, cand.ep, cand.mbs, cand.zero, cand.recompute, cand.sp, k)
        hit = self._stage_cache.get(key)
        if hit is None:
            cost = self.costs[k]
            dt = cost.dtypes(cand.zero, cand.dp)
            dims = ParallelDims.of(cand._replace(pp=1), DEFAULT_ORDER)
            tp_group, dp_group, ep_group, edp_group = (cost.group(dims, d) for d in ("tp", "dp", "ep", "edp"))
            blk = cost.block(cand.tp, cand.mbs, cand.sp, cand.recompute, tp_group, dt, cand.ep, ep_group)
            ends = cost.ends(cand.tp, cand.mbs, cand.sp, tp_group, dt)
            hit = self._stage_cache[key] = StageParts(cost, blk, ends, dt, tp_group, dp_group, edp_group, ep_group)
        return hit

    def block_seconds(self, cand: Candidate, k: int) -> float:
        """One block's forward, backward and recompute on group k, one micro-batch (seconds), with its parameters'
        gathers, gradients' accumulation and wrapper hooks as the estimate prices them (state_traffic). The TP
        group is inside a node whatever dp is, and the dtypes depend on dp only through dp > 1."""
        traffic = self._traffic(cand, k)
        if cand.ep > 1:           # the all-to-alls depend on where the EP group sits
            part = self._on_group(cand, k)
            return part.cost.block(cand.tp, cand.mbs, cand.sp, cand.recompute, part.tp_group, part.dt, cand.ep,
                                   part.ep_group, traffic=traffic).total
        key = (cand.tp, cand.mbs, cand.sp, cand.recompute, cand.zero, cand.dp > 1, k, traffic)
        hit = self._block_seconds.get(key)
        if hit is None:
            cost = self.costs[k]
            inside, alone = Group(tuple(range(cand.tp)), 1), Group((0,), 1)   # alone: no expert parallelism, the
            # one-rank EP group the homogeneous model passes too, so both searches share one cached block
            hit = self._block_seconds[key] = cost.block(cand.tp, cand.mbs, cand.sp, cand.recompute, inside,
                                                        cost.dtypes(cand.zero, cand.dp), 1, alone,
                                                        traffic=traffic).total
        return hit

    def _traffic(self, cand: Candidate, k: int):
        """What the data-parallel wrapper adds to each block of `cand` on group k (CostModel.state_traffic)."""
        return self.costs[k].state_traffic(cand, cand.microbatches(self.training.global_batch))

    def end_seconds(self, cand: Candidate, groups: list[int]) -> tuple[dict[int, float], dict[int, float]]:
        """({group: embedding forward + backward}, {group: head and loss forward + backward}), seconds per
        micro-batch (the TP group inside a node), the gathered parameters' copy and their wrapper's hooks included."""
        first, last = {}, {}
        shared = self.model.tied_embeddings and cand.pp == 1
        for k in groups:
            traffic = self._traffic(cand, k)
            key = (cand.tp, cand.mbs, cand.sp, cand.zero, cand.dp > 1, k, shared, traffic.gather_forward,
                   traffic.root_hooks_s, traffic.reduce_copy)
            hit = self._end_seconds.get(key)
            if hit is None:
                cost = self.costs[k]
                ends = cost.ends(cand.tp, cand.mbs, cand.sp, Group(tuple(range(cand.tp)), 1),
                                 cost.dtypes(cand.zero, cand.dp), shared, traffic)
                hit = self._end_seconds[key] = (ends.emb_fwd.total + ends.emb_bwd.total,
                                                ends.head_fwd.total + ends.head_bwd.total)
            first[k], last[k] = hit
        return first, last

    # ------------------------------------------------------------------ placement of stages on devices
    def rank_order(self, cand: Candidate) -> tuple[int, ...]:
        """The group of each stage when rank r runs on device r: stages fill the groups in listing order."""
        return tuple(k for k, n in enumerate(self.capacity(cand.tp, cand.dp)) for _ in range(n))

    def devices(self, cand: Candidate, groups: tuple[int, ...]) -> tuple[int, ...]:
        """Global device of every rank (Megatron order: tp fastest, then dp, then pp): the j-th stage placed on a
        group takes that group's j-th block of tp * dp GPUs."""
        size = cand.tp * cand.dp
        used = [0] * len(self.groups)
        out = []
        for k in groups:
            base = self.groups[k].first_device + used[k] * size
            used[k] += 1
            out.extend(range(base, base + size))
        return tuple(out)

    def hop_seconds(self, cand: Candidate, devices: tuple[int, ...], s: int) -> float:
        """One activation transfer from stage s to s + 1 (the slowest of the stage's parallel pairs when links
        are measured; otherwise the pairs are alike)."""
        size = cand.tp * cand.dp
        nbytes = self.costs[0]._act_msg(cand)
        pairs = range(size) if self.cluster.link_matrix is not None else range(1)
        return max(self._transfer(nbytes, devices[s * size + r], devices[(s + 1) * size + r], size) for r in pairs)

    def _transfer(self, nbytes: float, src: int, dst: int, stage_gpus: int) -> float:
        ga, gb = self.links.group_of(src), self.links.group_of(dst)
        if ga == gb:
            g = self.groups[ga]
            return self.costs[ga].net.p2p(nbytes, src - g.first_device, dst - g.first_device)
        per_node = min(stage_gpus, self.groups[ga].gpus_per_node, self.groups[gb].gpus_per_node)
        return max(self.costs[ga].net.floor, self.links.p2p(nbytes, src, dst, per_node))

    def hop_table(self, cand: Candidate) -> list[list[float]]:
        """[k][k'] seconds of one transfer between consecutive stages on groups k and k' (spec-sheet links: any
        two stages of a pair of groups are alike, so the first two blocks of GPUs stand for all)."""
        K, size = len(self.groups), cand.tp * cand.dp
        nbytes = self.costs[0]._act_msg(cand)
        out = [[0.0] * K for _ in range(K)]
        for a in range(K):
            for b in range(K):
                ga, gb = self.groups[a], self.groups[b]
                if a == b:
                    if ga.gpus >= 2 * size:
                        out[a][b] = self._transfer(nbytes, ga.first_device, ga.first_device + size, size)
                else:
                    out[a][b] = self._transfer(nbytes, ga.first_device, gb.first_device, size)
                out[a][b] += self.costs[a].host_coll
        return out

    def most_layers(self, cand: Candidate) -> int:
        """Blocks the pipeline can hold at most, whatever the assignment: position s on group k holds at most
        capacity / (b + a * held_s) blocks, b the bytes one more block adds to the forward peak besides its
        activations, a its activations per micro-batch and held_s the micro-batches the position keeps (the
        homogeneous search's memory bound, CostModel.memory_bound, per position)."""
        nmb = cand.microbatches(self.training.global_batch)
        capacity = self.capacity(cand.tp, cand.dp)
        per_group = []
        for k, cost in enumerate(self.costs):
            if capacity[k]:
                dt = cost.dtypes(cand.zero, cand.dp)
                per_group.append((cost.capacity, cost._forward_bytes_per_block(cand, cost.recipe(cand.zero, cand.dp)),
                                  cost._block_activations(cand, dt)))
        total, L = 0, self.model.num_layers
        for held, positions in self._held_positions(cand, nmb):
            total += positions * max(int(cap // (b + a * held)) for cap, b, a in per_group)
            if total >= L:
                break
        return total

    def _held_positions(self, cand: Candidate, nmb: int) -> list[tuple[int, int]]:
        """(micro-batches kept at the peak, how many pipeline positions keep that many), the schedule's for any
        GPU type, fewest first."""
        key = (cand.schedule, cand.pp, nmb)
        hit = self._held.get(key)
        if hit is None:
            held = Counter(max(self.costs[0]._held(cand, s, nmb)) for s in range(cand.pp))
            hit = self._held[key] = sorted(held.items())
        return hit

    # ------------------------------------------------------------------ the assignment problem
    def problem(self, cand: Candidate, memory: bool = True) -> StageProblem:
        """The stage-to-group problem of `cand` (planner.hetero.assign): per-block and per-position seconds,
        and each position's most blocks by its group's memory timeline (with `memory` False: no cap but the
        layer count, for a first try that memory may not bind)."""
        p, K = cand.pp, len(self.groups)
        nmb = cand.microbatches(self.training.global_batch)
        host = self.engine.host.per_microbatch_s
        block, extra, caps = [], [[0.0] * K for _ in range(p)], [[0] * K for _ in range(p)]
        capacity = self.capacity(cand.tp, cand.dp)
        for k in range(K):
            ends = self._on_group(cand, k).ends
            block.append(self._on_group(cand, k).blk.total)
            for s in range(p):
                extra[s][k] = host
                if s == 0:
                    extra[s][k] += ends.emb_fwd.total + ends.emb_bwd.total
                if s == p - 1:
                    extra[s][k] += ends.head_fwd.total + ends.head_bwd.total
            if capacity[k]:
                for s, cap in enumerate(self._caps(cand, k, nmb) if memory else [self.model.num_layers] * p):
                    caps[s][k] = cap
        # both stages of a hop pay its transfer, blocking or not: an asynchronous transfer does not occupy them,
        # but every micro-batch's activation and gradient cross it, so the two stages' steady-state loop takes
        # (D_s + D_s+1) / 2 + c <= max(D_s, D_s+1) + c (pipeline.py), equal when the split balances them
        hop = self.hop_table(cand) if p > 1 else [[0.0] * K for _ in range(K)]
        return StageProblem(self.model.num_layers, nmb, block, extra, caps, hop, capacity)

    def _caps(self, cand: Candidate, k: int, nmb: int) -> list[int]:
        """The most blocks each pipeline position holds on group k (the homogeneous model's per-device caps)."""
        part = self._on_group(cand, k)
        return part.cost._device_caps(cand, nmb, part.blk, part.dt)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cand: Candidate, groups: tuple[int, ...], layers: list[int], method: str = "") -> HeteroCore:
        """Step time, breakdown and memory of `cand` with stage s on group groups[s] holding layers[s] blocks."""
        m, host = self.model, self.engine.host
        p, last = cand.pp, cand.pp - 1
        nmb = cand.microbatches(self.training.global_batch)
        parts = [self._on_group(cand, k) for k in groups]
        # each stage priced with its own blocks (dense and MoE layers), as the homogeneous model does; the
        # assignment and split above weighed mean blocks
        mixes = ([part.cost.range_mix(sum(layers[:s]), n) for s, (part, n) in enumerate(zip(parts, layers))]
                 if len(parts[0].cost.mix) > 1 else [None] * p)
        # and with its parameters' gathers, gradients' accumulation and hooks (as the assignment weighed them)
        traffic = [part.cost.state_traffic(cand, nmb) for part in parts]
        blocks = [part.cost.block(cand.tp, cand.mbs, cand.sp, cand.recompute, part.tp_group, part.dt, cand.ep,
                                  part.ep_group, mix, t) for part, mix, t in zip(parts, mixes, traffic)]
        ends = [part.cost.ends(cand.tp, cand.mbs, cand.sp, part.tp_group, part.dt, m.tied_embeddings and p == 1, t)
                for part, t in zip(parts, traffic)]
        params = [parts[s].cost.device_params(cand, s, n, mixes[s]) for s, n in enumerate(layers)]
        devices = self.devices(cand, groups)
        tied = m.tied_embeddings and p > 1
        work = [DeviceWork(n, blocks[s], ends[s], part.cost.stage_comm(cand, params[s], n, part.dp_group,
                                                                         part.edp_group, mixes[s]),
                           self._tied_sync(cand, devices, part.cost) if tied and s in (0, last) else 0.0,
                           part.cost.optimizer_seconds(cand, params[s], n, mixes[s], device=s))
                for s, (part, n) in enumerate(zip(parts, layers))]
        blocking = self.engine.overlap.pp_p2p == "exposed"
        hops = [self.hop_seconds(cand, devices, s) + self.costs[0].host_coll for s in range(p - 1)]
        kappa = max(part.cost.dp_overlap_slowdown(cand.zero) for part in parts)   # 1 on a device without streams
        times = step_times(cand.schedule, 1, nmb, work, hops if p > 1 else 0.0, kappa,
                           host.per_microbatch_s, host.per_step_s, blocking, self.engine.overlap.gather_window)
        p2p = max(hops, default=0.0)

        stages = [parts[s].cost.stage_memory(cand, s, [layers[s]], nmb, blocks[s], parts[s].dt, mixes[s])
                  for s in range(p)]
        reserved = [st.total * parts[s].cost.margin for s, st in enumerate(stages)]
        budgets = [parts[s].cost.budget_bytes for s in range(p)]
        feasible = all(r <= b for r, b in zip(reserved, budgets))
        return HeteroCore(cand, tuple(groups), list(layers), nmb, times.step, times.crit, times.time, stages,
                          reserved, budgets, feasible, devices, p2p, method)

    def _tied_sync(self, cand: Candidate, devices: tuple[int, ...], cost: CostModel) -> float:
        """The tied embedding's gradient all-reduce between the first and the last stage's GPU of each replica."""
        size = cand.tp * cand.dp
        a, b = devices[0], devices[(cand.pp - 1) * size]
        recipe = cost.recipe(cand.zero, cand.dp)
        nbytes = cost.vocab(cand.tp) * self.model.hidden_size / cand.tp * recipe.reduce_bytes
        ga, gb = self.links.group_of(a), self.links.group_of(b)
        if ga == gb:
            g = self.groups[ga]
            pair = (a - g.first_device, b - g.first_device)
            return cost.net.collective("all_reduce", nbytes, Group.of(pair, g.gpus_per_node))
        return self.links.all_reduce(nbytes, a, b, min(size, self.groups[ga].gpus_per_node))
