"""The cost model: (model, cluster, training, parallel config) -> Prediction.

Pure functions of the specs, with caches for the per-block work that many configurations share (the
search evaluates thousands of configurations through one CostModel). Nothing here imports torch.
`evaluate_core` returns plain floats for the search; `evaluate` wraps the same numbers in a Prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost.comm import Group, Network
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.kernels import Dtypes, Pass, block_work, embedding_work, head_work, pass_time
from planner.cost.measured import MeasuredCosts
from planner.cost.memory import (GIB, block_activation_bytes, block_backward_transient_bytes,
                                 embedding_activation_bytes, head_activation_bytes, head_transient_bytes,
                                 in_flight_microbatches, interleaved_in_flight_chunks, state_bytes)
from planner.cost.params import embedding_params, final_norm_params, layer_params, position_params
from planner.cost.pipeline import pipeline_time
from planner.layout import DEFAULT_ORDER, Layout
from planner.partition import partition_layers
from planner.profile_data import ModelProfile
from planner.prediction import (MemoryBreakdown, Predicted, Prediction, ResolvedConfig, StageMemory,
                                TimeBreakdown)
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec
from planner.validate import check_config


# Fraction of the usable memory a plan keeps free. PyTorch's caching allocator leaves on average 15% (up to
# 33%) of its reserved memory unusable in LLM training with recomputation and ZeRO (GMLake, Guo et al.
# ASPLOS'24, arXiv:2401.08156, eight LLMs on A100-80GB); `allocator_margin` already adds 5% of the allocated
# peak, so about 1 - 1.05 * 0.85 ~ 10% more must stay free for the average run (Galvatron keeps 20%).
MEMORY_HEADROOM = 0.10


def optimizer_bytes_per_param(precision: str, optimizer: str) -> float:
    """Device-memory traffic of one optimizer step per parameter (Megatron's MixedPrecisionOptimizer.step):
    gradient-norm read and clip (4 + 8), the update (Adam reads p, g, m, v and writes p, m, v: 28; SGD with
    momentum 20), fp16 also copies grads to fp32 and unscales them (6 + 8), and the 16-bit recipes copy the
    fp32 master back to the 16-bit weights (4 + 2)."""
    update = 20 if optimizer == "sgd" else 28
    extra = {"bf16": 6, "fp16": 6 + 14, "amp-bf16": 0, "fp32": 0}[precision]
    return 12 + update + extra


def _exposed(comm: float, window: float, slowdown: float) -> float:
    """Communication left on the critical path when overlapped with `window` seconds of compute: what does
    not fit, plus the slow-down the overlapped part inflicts on compute (Galvatron's overlap coefficient)."""
    return max(0.0, comm - window) + slowdown * min(comm, window)


@dataclass(frozen=True)
class PassCost:
    compute: float     # kernels, seconds
    comm: float        # TP collectives, seconds

    @property
    def total(self) -> float:
        return self.compute + self.comm


@dataclass(frozen=True)
class BlockCost:
    """One block, one micro-batch, one TP rank."""

    forward: PassCost
    backward: PassCost
    recompute: PassCost
    activation_bytes: float      # kept for backward
    transient_bytes: float       # backward working set

    @property
    def total(self) -> float:
        return self.forward.total + self.backward.total + self.recompute.total


@dataclass(frozen=True)
class EndsCost:
    """Embedding (first stage) and LM head with loss (last stage), one micro-batch."""

    emb_fwd: PassCost
    emb_bwd: PassCost
    head_fwd: PassCost
    head_bwd: PassCost


@dataclass
class Core:
    """Everything `evaluate` reports, as plain numbers."""

    cfg: ParallelConfig           # or a search Candidate, which has the same fields
    order: tuple[str, str, str]
    chunks: list[int]
    nmb: int
    step: float
    crit: int
    time: dict[str, float]
    stages: list[tuple[int, float, float, float, float, float]]   # layers, params, grads, optimizer, acts, other
    peak_total: float
    peak_reserved: float
    fullest: int
    feasible: bool
    devices: tuple[int, ...] | None = None   # placement: device of each rank (None: rank r on device r)


class CostModel:
    """Costs of parallel configurations for one (model, cluster, training)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                 profile: ModelProfile | None = None, profile_name: str = "profile",
                 memory_headroom: float = MEMORY_HEADROOM):
        self.model, self.cluster, self.training = model, cluster, training
        self.gpu = cluster.gpu
        self.dt = Dtypes.of(training.precision)
        self.states = state_bytes(training.precision, training.optimizer)
        self.net = Network(cluster)
        self.layer = layer_params(model)
        self.seq = training.seq_len
        self.usable_bytes = self.gpu.memory_bytes - self.gpu.runtime_reserved_bytes
        self.memory_headroom = memory_headroom
        self.budget_bytes = self.usable_bytes * (1.0 - memory_headroom)   # what a feasible plan may reserve
        self.margin = 1.0 + self.gpu.allocator_margin
        self.opt_seconds_per_param = (optimizer_bytes_per_param(training.precision, training.optimizer)
                                      / (self.gpu.hbm_bandwidth * self.gpu.efficiency.memory))
        measured = MeasuredCosts(profile, model, training, self.gpu, cluster.backend) if profile else None
        self.sources = self._sources(profile_name, measured)
        self.measured = measured if measured and not measured.mismatch else None
        if self.measured and self.measured.optimizer_s_per_param:
            self.opt_seconds_per_param = self.measured.optimizer_s_per_param
        self._blocks: dict[tuple, BlockCost] = {}
        self._ends: dict[tuple, EndsCost] = {}
        self._layouts: dict[tuple, tuple[Layout, Group, Group]] = {}
        self._held_cache: dict[tuple, list[int]] = {}
        self._end_bytes_cache: dict[tuple, tuple[float, float, float]] = {}
        self._p2p_cache: dict[tuple, float] = {}
        self._pairs_cache: dict[Layout, tuple[tuple[int, int], ...]] = {}
        self._signatures: dict[tuple, tuple] = {}
        self._work_cache: dict[tuple, float] = {}
        self._state_bounds_cache: dict[tuple, tuple[float, float, float, float]] = {}

    def _sources(self, profile_name: str, measured: MeasuredCosts | None) -> dict[str, str]:
        """Which numbers are measured and which computed, for the report."""
        links = ("measured link matrix" if self.cluster.link_matrix is not None
                 else f"alpha-beta from the {self.cluster.name} spec")
        out = {"layer times and activation bytes": "computed (analytical kernels)", "communication": links}
        if measured is not None:
            if measured.mismatch:
                out["layer times and activation bytes"] = f"computed ({profile_name} not used: {measured.mismatch})"
            else:
                out["layer times and activation bytes"] = f"measured ({profile_name})"
                if measured.optimizer_s_per_param:
                    out["optimizer"] = f"measured ({profile_name})"
        if self.cluster.measured:
            out["device efficiency"] = "measured (profiled cluster)"
        return out

    # ------------------------------------------------------------------ cached pieces
    def layout(self, tp: int, pp: int, dp: int, order: tuple[str, str, str],
               devices: tuple[int, ...] | None = None) -> tuple[Layout, Group, Group]:
        """(layout, the TP groups, the DP groups): a representative group, with every parallel group as its
        peers when links are measured (the slowest one sets the pace)."""
        key = (tp, pp, dp, order, devices)
        hit = self._layouts.get(key)
        if hit is None:
            lay = Layout(tp, pp, dp, self.cluster.gpus_per_node, order, devices)
            every = self.net.matrix is not None
            hit = self._layouts[key] = (lay, lay.group("tp", every), lay.group("dp", every))
        return hit

    def _pass_cost(self, p: Pass, tp_group: Group) -> PassCost:
        comm = sum(self.net.collective(c.op, c.bytes, tp_group) for c in p.collectives)
        return PassCost(pass_time(p, self.gpu, self.dt.matmul), comm)

    def block(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group) -> BlockCost:
        key = (tp, mbs, sp, recompute, tp_group if self.net.matrix else tp_group.nodes)
        cost = self._blocks.get(key)
        if cost is None:
            w = block_work(self.model, mbs, self.seq, tp, sp, recompute, self.dt)
            fwd, bwd, rec = (self._pass_cost(p, tp_group) for p in (w.forward, w.backward, w.recompute))
            acts = block_activation_bytes(self.model, mbs, self.seq, tp, sp, recompute, self.dt)
            factors = self.measured.block(tp, mbs, recompute) if self.measured else None
            if factors is not None:   # measured kernels; TP collectives stay on the cluster's links
                fwd, bwd, rec = (PassCost(pc.compute * k, pc.comm) for pc, k in
                                 ((fwd, factors.forward), (bwd, factors.backward), (rec, factors.backward)))
                acts *= factors.activations
            cost = self._blocks[key] = BlockCost(
                fwd, bwd, rec, acts,
                block_backward_transient_bytes(self.model, mbs, self.seq, tp, sp, recompute, self.dt))
        return cost

    def ends(self, tp: int, mbs: int, sp: bool, tp_group: Group) -> EndsCost:
        key = (tp, mbs, sp, tp_group if self.net.matrix else tp_group.nodes)
        cost = self._ends.get(key)
        if cost is None:
            ef, eb = embedding_work(self.model, mbs, self.seq, tp, sp, self.dt)
            hf, hb = head_work(self.model, mbs, self.seq, tp, sp, self.dt)
            parts = [self._pass_cost(p, tp_group) for p in (ef, eb, hf, hb)]
            if self.measured:
                for i, part in ((0, "embedding"), (2, "head")):
                    factors = self.measured.end(part, tp, mbs)
                    if factors is not None:
                        parts[i] = PassCost(parts[i].compute * factors.forward, parts[i].comm)
                        parts[i + 1] = PassCost(parts[i + 1].compute * factors.backward, parts[i + 1].comm)
            cost = self._ends[key] = EndsCost(*parts)
        return cost

    # ------------------------------------------------------------------ parameters and memory
    def device_params(self, cfg: ParallelConfig, device: int, layers: int) -> float:
        """Parameters one TP rank of pipeline device `device` holds (elements)."""
        m, tp = self.model, cfg.tp
        params = layers * self.layer.per_tp_rank(tp)
        if device == 0:
            params += embedding_params(m, tp) / tp + position_params(m)
        if device == cfg.pp - 1:
            params += final_norm_params(m)
            if not m.tied_embeddings or cfg.pp > 1:      # untied head, or the tied copy on the last stage
                params += embedding_params(m, tp) / tp
        return params

    def _state_bytes_per_param(self, zero: int, dp: int) -> tuple[float, float, float]:
        """(weights, grads, optimizer) bytes per local parameter after ZeRO sharding (arXiv:1910.02054 Sec. 5)."""
        s = self.states
        return (s.weights / (dp if zero >= 3 else 1), s.grads / (dp if zero >= 2 else 1),
                (s.master + s.optimizer) / (dp if zero >= 1 else 1))

    def _held(self, cfg: ParallelConfig, device: int, nmb: int) -> list[int]:
        """Micro-batches in flight for each local chunk of a device at its peak."""
        key = (cfg.schedule, cfg.pp, cfg.vpp, device, nmb)
        held = self._held_cache.get(key)
        if held is None:
            if cfg.schedule == "interleaved":
                held = interleaved_in_flight_chunks(cfg.pp, cfg.vpp, device, nmb)
            else:
                held = [in_flight_microbatches(cfg.schedule, cfg.pp, device, nmb)]
            self._held_cache[key] = held
        return held

    def _buffers(self, cfg: ParallelConfig) -> float:
        """Data-parallel communication buffers (bytes). ZeRO-3 keeps the block it computes and the prefetched
        next one unsharded, plus one block's unsharded gradients before their reduce-scatter; the other
        stages reduce the gradient buffers in place (Megatron's contiguous grad buffer, FSDP2's per-module
        reduction)."""
        if cfg.dp == 1 or cfg.zero < 3:
            return 0.0
        return self.layer.per_tp_rank(cfg.tp) * (2 * self.states.weights + self.states.grads)

    def _end_bytes(self, tp: int, mbs: int, sp: bool) -> tuple[float, float, float]:
        """(embedding activations, head activations, head transient) bytes per micro-batch."""
        key = (tp, mbs, sp)
        hit = self._end_bytes_cache.get(key)
        if hit is None:
            m, dt = self.model, self.dt
            hit = self._end_bytes_cache[key] = (embedding_activation_bytes(m, mbs, self.seq, tp, sp),
                                                head_activation_bytes(m, mbs, self.seq, tp, sp, dt),
                                                head_transient_bytes(m, mbs, self.seq, tp, dt))
        return hit

    def stage_memory(self, cfg: ParallelConfig, device: int, chunk_layers: list[int], nmb: int,
                     blk: BlockCost) -> tuple[float, float, float, float, float]:
        """(params, grads, optimizer, activations, other) bytes on one GPU of a pipeline device whose local
        chunks hold `chunk_layers` blocks. Affine in the block count, which the layer split relies on."""
        params = self.device_params(cfg, device, sum(chunk_layers))
        w, g, o = self._state_bytes_per_param(cfg.zero, cfg.dp)
        held = self._held(cfg, device, nmb)
        emb_act, head_act, head_transient = self._end_bytes(cfg.tp, cfg.mbs, cfg.sp)
        acts = blk.activation_bytes * sum(n * h for n, h in zip(chunk_layers, held))
        other = blk.transient_bytes
        if device == 0:
            acts += emb_act * held[0]
        if device == cfg.pp - 1:
            acts += head_act * held[-1]
            other = max(other, head_transient)
        return params * w, params * g, params * o, acts, other + self._buffers(cfg)

    # ------------------------------------------------------------------ layer split
    def default_layers(self, cfg: ParallelConfig, blk: BlockCost, ends: EndsCost) -> list[int]:
        """Blocks per chunk: for one chunk per device, the split minimising the slowest stage under every
        stage's memory (falling back to time alone when nothing fits); near-equal chunks when interleaved."""
        m, chunks = self.model, cfg.pp * cfg.vpp
        if cfg.vpp > 1 or cfg.pp == 1:
            # near-equal chunks; the remainder goes to the chunks without the embedding or the head
            base, rest = divmod(m.num_layers, chunks)
            order = list(range(1, chunks - 1)) + [0, chunks - 1] if chunks > 2 else list(range(chunks))
            split = [base] * chunks
            for j in order[:rest]:
                split[j] += 1
            return split
        extra = [0.0] * cfg.pp
        extra[0] += ends.emb_fwd.total + ends.emb_bwd.total
        extra[-1] += ends.head_fwd.total + ends.head_bwd.total
        nmb = cfg.microbatches(self.training.global_batch)
        w, g, o = self._state_bytes_per_param(cfg.zero, cfg.dp)
        per_block_states = self.layer.per_tp_rank(cfg.tp) * (w + g + o)
        per_block, base = [], []
        for i in range(cfg.pp):
            per_block.append(per_block_states + blk.activation_bytes * self._held(cfg, i, nmb)[0])
            base.append(sum(self.stage_memory(cfg, i, [0], nmb, blk)))
        split = partition_layers(m.num_layers, blk.total, extra, per_block, base, self.budget_bytes / self.margin)
        return split or partition_layers(m.num_layers, blk.total, extra)

    # ------------------------------------------------------------------ lower bounds for the search
    def bounds(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER) -> tuple[float, float]:
        """(step seconds, peak reserved bytes) that no layer split of `cfg` can beat.

        Time: with total work W per micro-batch over p devices, every schedule's closed form is at least its
        balanced value, (m + p - 1) W/p, or (m + (p-1)/v) W/p interleaved; the optimizer step of the device
        with the most parameters takes at least that of the average device.
        Memory: the fullest stage holds at least L / sum_i 1/a_i, a_i = one block's states plus its
        activations times the micro-batches stage i holds (the continuous relaxation of the split), with
        the sum bounded above by an integral; plus the transient and buffer bytes every stage has.
        """
        layout, tp_group, dp_group = self.layout(cfg.tp, cfg.pp, cfg.dp, order)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group)
        work = self._work(cfg, blk, tp_group)
        per_cycle, post, block_states, buffers = self._state_bounds(cfg, order, dp_group)
        nmb = cfg.microbatches(self.training.global_batch)
        p, L = cfg.pp, self.model.num_layers
        interleaved = cfg.schedule == "interleaved"
        fill = (p - 1) / cfg.vpp if interleaved else p - 1
        # GPipe's closed form charges transfers per phase, not per device cycle
        transfers = 0.0 if p == 1 or cfg.schedule == "gpipe" else \
            (2 * cfg.vpp if interleaved else 2) * self._p2p(layout, self._act_msg(cfg))
        time_lb = (nmb + fill) * (work / p + transfers + per_cycle) + post
        s, a = block_states, blk.activation_bytes
        if cfg.schedule == "gpipe":
            inv_sum = p / (s + a * nmb)
        else:   # 1F1B holds min(p - i, m); interleaving holds more, so this bound holds for it too
            k = min(p, nmb)
            inv_sum = math.log1p(a * k / s) / a if a > 0 else k / s
            inv_sum += (p - k) / (s + a * k)
        mem_lb = (L / inv_sum + blk.transient_bytes + buffers) * self.margin
        return time_lb, mem_lb

    def _work(self, cfg: ParallelConfig, blk: BlockCost, tp_group: Group) -> float:
        """Seconds of all forward and backward work of one micro-batch over the whole model (one TP rank)."""
        key = (cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group if self.net.matrix else tp_group.nodes)
        work = self._work_cache.get(key)
        if work is None:
            ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group)
            work = self._work_cache[key] = (self.model.num_layers * blk.total + ends.emb_fwd.total
                                            + ends.emb_bwd.total + ends.head_fwd.total + ends.head_bwd.total)
        return work

    def _state_bounds(self, cfg: ParallelConfig, order: tuple[str, str, str],
                      dp_group: Group) -> tuple[float, float, float, float]:
        """(exposed DP seconds per cycle, seconds after the last backward, one block's state bytes, buffer bytes)
        for the average device: the parts of the bounds that depend only on the degrees and ZeRO."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.zero, order)
        hit = self._state_bounds_cache.get(key)
        if hit is None:
            avg_params = self._total_params_per_tp_rank(cfg) / cfg.pp
            per_cycle, post = self._dp_comm_bounds(cfg, avg_params, dp_group)
            post += avg_params / (cfg.dp if cfg.zero >= 1 else 1) * self.opt_seconds_per_param
            w, g, o = self._state_bytes_per_param(cfg.zero, cfg.dp)
            hit = self._state_bounds_cache[key] = (per_cycle, post, self.layer.per_tp_rank(cfg.tp) * (w + g + o),
                                                   self._buffers(cfg))
        return hit

    def _dp_comm_bounds(self, cfg: ParallelConfig, params: float, dp_group: Group) -> tuple[float, float]:
        """Lower bounds on the data-parallel communication a device with `params` parameters leaves exposed:
        (per micro-batch cycle, after the last backward). Overlapped communication costs at least the
        overlap slow-down times itself; collectives are affine in bytes, so the average device bounds the
        busiest one, and one call bounds the block-by-block calls `_dp_collective` makes."""
        if cfg.dp == 1:
            return 0.0, 0.0
        kappa, net = self.cluster.overlap_slowdown, self.net
        grad_kappa = kappa if self.training.overlap_grad_reduce else 1.0   # not overlapped: all of it shows
        grads, weights = params * self.states.grads, params * self.states.weights
        if cfg.zero == 0:
            return 0.0, grad_kappa * net.collective("all_reduce", grads, dp_group)
        if cfg.zero == 1:
            return 0.0, grad_kappa * net.collective("reduce_scatter", grads, dp_group) + net.collective(
                "all_gather", weights, dp_group)
        rs = grad_kappa * net.collective("reduce_scatter", grads, dp_group)
        if cfg.zero == 2:
            return rs, net.collective("all_gather", weights, dp_group)
        return rs + 2 * kappa * net.collective("all_gather", weights, dp_group), 0.0

    def _dp_collective(self, op: str, nbytes: float, blocks: int, dp_group: Group) -> float:
        """A data-parallel collective issued block by block (FSDP2's per-module groups; Megatron's buckets hold
        about a block of a large model): one call per block plus one for the embedding, head and norms."""
        pieces = blocks + 1
        return pieces * self.net.collective(op, nbytes / pieces, dp_group)

    def placement_signature(self, tp: int, pp: int, dp: int, order: tuple[str, str, str]) -> tuple:
        """What the cost model sees of a rank order: nodes spanned by the TP and DP groups and which pipeline
        boundaries cross nodes (with a measured link matrix, the ranks themselves)."""
        key = (tp, pp, dp, order)
        sig = self._signatures.get(key)
        if sig is None:
            layout, tp_group, dp_group = self.layout(tp, pp, dp, order)
            node = self.cluster.gpus_per_node
            crossings = tuple(layout.rank(i, 0, 0) // node != layout.rank(i + 1, 0, 0) // node
                              for i in range(pp - 1))
            sig = order if self.net.matrix is not None else (tp_group.nodes, dp_group.nodes, crossings)
            self._signatures[key] = sig
        return sig

    def _total_params_per_tp_rank(self, cfg: ParallelConfig) -> float:
        return sum(self.device_params(cfg, i, 0) for i in {0, cfg.pp - 1}) + \
            self.model.num_layers * self.layer.per_tp_rank(cfg.tp)

    # ------------------------------------------------------------------ evaluation
    def _act_msg(self, cfg: ParallelConfig) -> float:
        """Bytes of the activation one micro-batch sends between stages (sequence-sharded under SP)."""
        return cfg.mbs * self.seq * self.model.hidden_size * self.dt.act / (cfg.tp if cfg.sp else 1)

    def _p2p(self, layout: Layout, nbytes: float) -> float:
        """The slowest activation transfer between neighbouring stages (over every rank pair when measured)."""
        key = (layout, nbytes)
        t = self._p2p_cache.get(key)
        if t is None:
            t = self._p2p_cache[key] = max((self.net.p2p(nbytes, a, b) for a, b in self._stage_pairs(layout)),
                                           default=0.0)
        return t

    def _stage_pairs(self, layout: Layout) -> tuple[tuple[int, int], ...]:
        """Device pairs of neighbouring stages: every pair when links are measured; else one pair inside a node
        and one across nodes where the pipeline has them (spec-sheet links differ only by that)."""
        pairs = self._pairs_cache.get(layout)
        if pairs is None:
            coords = ([(d, k) for d in range(layout.dp) for k in range(layout.tp)] if self.net.matrix is not None
                      else [(0, 0)])
            every = [(layout.device(layout.rank(i, d, k)), layout.device(layout.rank(i + 1, d, k)))
                     for i in range(layout.pp - 1) for d, k in coords]
            if self.net.matrix is None:
                node = self.cluster.gpus_per_node
                every = list({a // node == b // node: (a, b) for a, b in every}.values())
            pairs = self._pairs_cache[layout] = tuple(every)
        return pairs

    def _tied_pair(self, layout: Layout) -> Group:
        """First and last stage devices that all-reduce the tied embedding's gradients."""
        def pair(d: int, k: int) -> tuple[int, int]:
            return layout.device(layout.rank(0, d, k)), layout.device(layout.rank(layout.pp - 1, d, k))
        peers = (tuple(pair(d, k) for d in range(layout.dp) for k in range(layout.tp))
                 if self.net.matrix is not None else ())
        return Group.of(pair(0, 0), self.cluster.gpus_per_node, peers)

    def evaluate_core(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                      devices: tuple[int, ...] | None = None) -> Core:
        """Step time, its breakdown and memory per stage of a valid `cfg` (see `evaluate`); `devices` places
        rank r on device devices[r]."""
        m, tr = self.model, self.training
        nmb = cfg.microbatches(tr.global_batch)
        layout, tp_group, dp_group = self.layout(cfg.tp, cfg.pp, cfg.dp, order, devices)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group)
        ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group)
        chunks = list(cfg.layers_per_stage) if cfg.layers_per_stage else self.default_layers(cfg, blk, ends)
        pp, last = cfg.pp, cfg.pp - 1
        device_chunks = [chunks[i::pp] for i in range(pp)]
        layers = [sum(c) for c in device_chunks]
        params = [self.device_params(cfg, i, n) for i, n in enumerate(layers)]

        # --- per-device, per-micro-batch times (embedding on the first device, head and loss on the last)
        fwd = [n * blk.forward.total for n in layers]
        bwd = [n * (blk.backward.total + blk.recompute.total) for n in layers]
        fwd[0] += ends.emb_fwd.total
        bwd[0] += ends.emb_bwd.total
        fwd[last] += ends.head_fwd.total
        bwd[last] += ends.head_bwd.total

        # --- ZeRO-2/3 communication every micro-batch, overlapped with that micro-batch's compute (gradient
        # reduction only when the framework overlaps it)
        kappa = self.cluster.overlap_slowdown
        overlap = 1.0 if tr.overlap_grad_reduce else 0.0
        zero_exposed = [0.0] * pp
        if cfg.zero >= 2 and cfg.dp > 1:
            for i in range(pp):
                grads_rs = self._dp_collective("reduce_scatter", params[i] * self.states.grads, layers[i], dp_group)
                gather = 0.0
                if cfg.zero == 3:   # FSDP gathers block by block, in forward and again in backward
                    gather = self._dp_collective("all_gather", params[i] * self.states.weights, layers[i], dp_group)
                fwd_exposed = _exposed(gather, fwd[i], kappa)
                bwd_exposed = _exposed(gather, bwd[i], kappa) + _exposed(grads_rs, bwd[i] * overlap, kappa)
                zero_exposed[i] = fwd_exposed + bwd_exposed
                fwd[i] += fwd_exposed
                bwd[i] += bwd_exposed

        # --- pipeline
        p2p = self._p2p(layout, self._act_msg(cfg))
        pipe, crit = pipeline_time(cfg.schedule, nmb, fwd, bwd, p2p, cfg.vpp)

        # --- after the last backward: DP gradient reduction, tied-embedding sync, optimizer
        post = []
        for i in range(pp):
            comm = 0.0
            if cfg.dp > 1:
                grads, weights, n = params[i] * self.states.grads, params[i] * self.states.weights, layers[i]
                if cfg.zero == 0:
                    comm = _exposed(self._dp_collective("all_reduce", grads, n, dp_group), bwd[i] * overlap, kappa)
                elif cfg.zero == 1:
                    comm = (_exposed(self._dp_collective("reduce_scatter", grads, n, dp_group), bwd[i] * overlap,
                                     kappa)
                            + self._dp_collective("all_gather", weights, n, dp_group))
                elif cfg.zero == 2:
                    comm = self._dp_collective("all_gather", weights, n, dp_group)
            if m.tied_embeddings and pp > 1 and i in (0, last):
                comm += self.net.collective("all_reduce", embedding_params(m, cfg.tp) / cfg.tp * self.states.grads,
                                            self._tied_pair(layout))
            opt = params[i] / (cfg.dp if cfg.zero >= 1 else 1) * self.opt_seconds_per_param
            post.append((comm + opt, comm, opt))
        post_total, post_comm, post_opt = max(post)
        step = pipe + post_total

        # --- time breakdown on the critical path (sums to step)
        n = layers[crit]
        recompute = n * blk.recompute.compute
        tp_comm = n * (blk.forward.comm + blk.backward.comm + blk.recompute.comm)
        for is_end, parts in ((crit == 0, (ends.emb_fwd, ends.emb_bwd)), (crit == last, (ends.head_fwd, ends.head_bwd))):
            if is_end:
                tp_comm += parts[0].comm + parts[1].comm
        compute = fwd[crit] + bwd[crit] - zero_exposed[crit] - recompute - tp_comm
        transfers = (2 * cfg.vpp if cfg.schedule == "interleaved" else 2) * p2p if pp > 1 else 0.0
        time = dict(compute=nmb * compute, recompute=nmb * recompute, tp_comm=nmb * tp_comm,
                    pp_comm=nmb * transfers, dp_comm_exposed=nmb * zero_exposed[crit] + post_comm,
                    optimizer=post_opt)
        time["bubble"] = max(0.0, step - sum(time.values()))

        # --- memory
        stages = [(layers[i], *self.stage_memory(cfg, i, device_chunks[i], nmb, blk)) for i in range(pp)]
        totals = [sum(st[1:]) for st in stages]
        fullest = max(range(pp), key=totals.__getitem__)
        peak_total = totals[fullest]
        peak_reserved = peak_total * self.margin
        return Core(cfg=cfg, order=order, chunks=chunks, nmb=nmb, step=step, crit=crit, time=time, stages=stages,
                    peak_total=peak_total, peak_reserved=peak_reserved, fullest=fullest,
                    feasible=peak_reserved <= self.budget_bytes, devices=devices)

    def sources_for(self, cfg: ParallelConfig) -> dict[str, str]:
        """`sources` with where this configuration's block numbers came from."""
        out = dict(self.sources)
        if self.measured is not None:
            factors = self.measured.block(cfg.tp, cfg.mbs, cfg.recompute)
            if factors is not None:
                out["layer times and activation bytes"] += f": {factors.measured_at}"
        return out

    def evaluate(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                 validate: bool = True) -> Prediction:
        """Predict step time, throughput and memory of `cfg` (validated against the specs first)."""
        if validate:
            check_config(self.model, self.cluster, self.training, cfg)
        return self.prediction(self.evaluate_core(cfg, order))

    def prediction(self, core: Core) -> Prediction:
        """The Prediction of an evaluated configuration."""
        m, tr, gpu, cfg = self.model, self.training, self.gpu, core.cfg
        usable, budget = self.usable_bytes, self.budget_bytes
        stages = [StageMemory(stage=i, layers=s[0], params=round(s[1]), grads=round(s[2]), optimizer=round(s[3]),
                              activations=round(s[4]), other=round(s[5]), total=round(sum(s[1:])),
                              reserved=round(sum(s[1:]) * self.margin)) for i, s in enumerate(core.stages)]
        fullest = stages[core.fullest]
        reason = "" if core.feasible else (
            f"out of memory: stage {fullest.stage} needs {fullest.reserved / GIB:.1f} GiB, "
            f"{(fullest.reserved - budget) / GIB:.1f} GiB more than the {budget / GIB:.1f} GiB budget "
            f"({usable / GIB:.1f} GiB usable less {self.memory_headroom:.0%} headroom)")
        time = TimeBreakdown(**core.time)
        step, gpus = core.step, cfg.tp * cfg.pp * cfg.dp
        model_flops = model_flops_per_step(m, tr.global_batch, self.seq)
        hw_flops = hardware_flops_per_step(m, tr.global_batch, self.seq, cfg.recompute == "full", cfg.tp)
        predicted = Predicted(
            step_time_s=step, tokens_per_s=tr.tokens_per_step / step,
            mfu=model_flops / (step * gpus * gpu.peak(self.dt.matmul)),
            tflops_per_gpu=model_flops / (step * gpus) / 1e12,
            hardware_tflops_per_gpu=hw_flops / (step * gpus) / 1e12,
            peak_memory_bytes=fullest.total, peak_reserved_bytes=fullest.reserved, critical_stage=core.crit,
            binding=_binding(time, step, fullest, budget, core.feasible),
            memory=MemoryBreakdown(capacity_bytes=gpu.memory_bytes, usable_bytes=round(usable),
                                   headroom=self.memory_headroom, budget_bytes=round(budget), stages=stages),
            time=time, sources=self.sources_for(cfg))
        fields = {k: getattr(cfg, k) for k in ParallelConfig.model_fields if k != "layers_per_stage"}
        resolved = ResolvedConfig(**fields, layers_per_stage=core.chunks, num_microbatches=core.nmb,
                                  layout=list(core.order),
                                  placement=list(core.devices) if core.devices is not None else None)
        return Prediction(feasible=core.feasible, reason=reason, config=resolved, predicted=predicted)


def _binding(time: TimeBreakdown, step: float, fullest: StageMemory, budget: float, feasible: bool) -> str:
    """One line: the largest shares of the step and how full the fullest GPU is."""
    shares = sorted(time.model_dump().items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / step:.0%}" for k, v in shares[:3] if v > 0)
    mem = f"stage {fullest.stage} memory {fullest.reserved / GIB:.1f} of a {budget / GIB:.1f} GiB budget"
    if not feasible:
        return f"memory: {mem}"
    kind = {"compute": "compute-bound", "recompute": "recompute-heavy", "bubble": "pipeline-bubble-bound",
            "tp_comm": "TP-communication-bound", "pp_comm": "PP-communication-bound",
            "dp_comm_exposed": "DP-communication-bound", "optimizer": "optimizer-bound"}[shares[0][0]]
    return f"{kind} ({top}); {mem}" + (" (tight)" if fullest.reserved > 0.95 * budget else "")

