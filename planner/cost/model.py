"""The cost model: (model, cluster, training, engine, parallel config) -> Prediction.

It assembles the pieces of planner/cost/: kernels per pass (kernels.py), collectives on the links the groups
use (comm.py), data-parallel communication as the engine issues it (dp_comm.py), the pipeline schedule
(pipeline.py) and the memory timeline (timeline.py), all as the engine (planner/engine.py) runs them. Pure
functions of the specs, with caches for the per-block work that many configurations share (the search
evaluates thousands of configurations through one CostModel). Nothing here imports torch.
`evaluate_core` returns plain numbers for the search; `evaluate` wraps the same numbers in a Prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost.comm import Group, Network
from planner.cost.dp_comm import DPComm, exposed, stage_dp_comm
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.kernels import Dtypes, KernelOptions, block_work, embedding_work, head_work, pass_time
from planner.cost.measured import MeasuredCosts
from planner.cost.memory import (GIB, autocast_weight_bytes, block_activation_bytes, block_backward_transient_bytes,
                                 embedding_activation_bytes, head_activation_bytes, head_transient_bytes,
                                 in_flight_microbatches, interleaved_in_flight_chunks, state_bytes)
from planner.cost.params import (final_norm_params, layer_params, padded_vocab_size, position_params,
                                 tensors_per_block, total_params)
from planner.cost.pipeline import p2p_on_path, pipeline_time
from planner.cost.stage_work import StageWork
from planner.cost.timeline import Regime, StageInputs, Timeline, grads_between_bytes, stage_timeline
from planner.engine import EngineSpec, engine_on, load_engine
from planner.layout import DEFAULT_ORDER, Layout
from planner.partition import partition_layers
from planner.profile_data import ModelProfile
from planner.prediction import (MemoryBreakdown, ModelSummary, Predicted, Prediction, ResolvedConfig, StageMemory,
                                TimeBreakdown)
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec
from planner.validate import check_config

# Fraction of the usable memory a plan keeps free. PyTorch's caching allocator leaves on average 15% (up to
# 33%) of its reserved memory unusable in LLM training with recomputation and ZeRO (GMLake, Guo et al.
# ASPLOS'24, arXiv:2401.08156, eight LLMs on A100-80GB); `allocator_margin` already adds 5% of the allocated
# peak, so about 1 - 1.05 * 0.85 ~ 10% more must stay free for the average run (Galvatron keeps 20%).
MEMORY_HEADROOM = 0.10

@dataclass(frozen=True)
class PassCost:
    compute: float     # kernels (and host time the GPU waits for), seconds
    comm: float        # TP collectives not hidden, seconds

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


@dataclass(frozen=True)
class StageMem:
    """Memory of one GPU of a pipeline stage at its peak phase, and every phase's total (bytes)."""

    layers: int
    params: float
    grads: float
    optimizer: float
    activations: float
    other: float
    phase: str
    phase_totals: dict[str, float]

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.other


@dataclass(frozen=True)
class _StageFixed:
    """The block-count-independent part of one device's memory (bytes, elements for params)."""

    recipe: object
    regime: Regime
    states: object                # StateBytes of the recipe at this ZeRO stage and dp
    grads_between: float          # timeline.grads_between_bytes
    held_per_chunk: list[int]
    block_params: float
    end_params: float
    last_params: float
    end_acts_held: float
    end_acts_one: float
    head_acts: float
    whole_grad_params: float
    head_transient: float
    head_backward: float
    copies_per_block: float
    end_copies: float
    pipeline_buffers: tuple[float, float]     # (kept all step, in flight)


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
    stages: list[StageMem]
    peak_total: float
    peak_reserved: float
    fullest: int
    feasible: bool
    devices: tuple[int, ...] | None = None   # placement: device of each rank (None: rank r on device r)
    work: StageWork | None = None            # per-device, per-micro-batch times behind `step` (timeline)


class CostModel:
    """Costs of parallel configurations for one (model, cluster, training, engine)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                 profile: ModelProfile | None = None, profile_name: str = "profile",
                 engine: EngineSpec | None = None, memory_headroom: float = MEMORY_HEADROOM):
        engine = engine_on(engine or load_engine(), cluster)
        if training.overlap_grad_reduce is not None:
            grad_reduce = "during_backward" if training.overlap_grad_reduce else "after_backward"
            engine = engine.model_copy(update={"overlap": engine.overlap.model_copy(
                update={"grad_reduce": grad_reduce})})
        if model.attention_kernel is None:
            model = model.model_copy(update={"attention_kernel": engine.kernels.attention})
        self.model, self.cluster, self.training, self.engine = model, cluster, training, engine
        self.gpu = cluster.gpu
        self.opts = KernelOptions.of(engine)
        self.host_fwd, self.host_bwd = engine.host_per_kernel
        self.host_coll = engine.host.per_collective_s
        self.net = Network(cluster)
        self.layer = layer_params(model)
        self.dp_calls_per_block = (tensors_per_block(model, "projections" in engine.fused)
                                   if engine.overlap.dp_calls == "parameter" else 1)
        self.seq = training.seq_len
        self.usable_bytes = self.gpu.memory_bytes - self.gpu.runtime_reserved_bytes
        self.memory_headroom = memory_headroom
        self.budget_bytes = self.usable_bytes * (1.0 - memory_headroom)   # what a feasible plan may reserve
        self.margin = 1.0 + self.gpu.allocator_margin
        measured = (MeasuredCosts(profile, model, training, self.gpu, cluster.backend, self.opts, self.host_fwd,
                                  self.host_bwd) if profile else None)
        self.sources = self._sources(profile_name, measured)
        self.measured = measured if measured and not measured.mismatch else None
        self._blocks: dict[tuple, BlockCost] = {}
        self._ends: dict[tuple, EndsCost] = {}
        self._layouts: dict[tuple, tuple[Layout, Group, Group]] = {}
        self._held_cache: dict[tuple, list[int]] = {}
        self._p2p_cache: dict[tuple, float] = {}
        self._pairs_cache: dict[Layout, tuple[tuple[int, int], ...]] = {}
        self._signatures: dict[tuple, tuple] = {}
        self._work_cache: dict[tuple, float] = {}
        self._state_bounds_cache: dict[tuple, tuple[float, float, float]] = {}
        self._dtypes: dict[tuple, Dtypes] = {}
        self._stage_memory_cache: dict[tuple, StageMem] = {}
        self._forward_slope_cache: dict[tuple, float] = {}
        self._stage_fixed_cache: dict[tuple, _StageFixed] = {}
        self._max_blocks_cache: dict[tuple, int] = {}
        self._acts_cache: dict[tuple, float] = {}
        self._memory_bound_cache: dict[tuple, float] = {}

    def _sources(self, profile_name: str, measured: MeasuredCosts | None) -> dict[str, str]:
        """Which numbers are measured and which computed, for the report."""
        links = ("measured link matrix" if self.cluster.link_matrix is not None
                 else f"alpha-beta from the {self.cluster.name} spec")
        out = {"engine": f"{self.engine.label()} (cluster_specs/engines)",
               "layer times and activation bytes": "computed (analytical kernels)", "communication": links}
        if measured is not None:
            if measured.mismatch:
                out["layer times and activation bytes"] = f"computed ({profile_name} not used: {measured.mismatch})"
            else:
                out["layer times and activation bytes"] = f"measured ({profile_name})"
                if measured.optimizer_s_per_param:
                    out["optimizer"] = f"measured ({profile_name})"
        if self.cluster.measured:
            out["device efficiency"] = "measured (profiled cluster)"
        if self.cluster.calibration is not None:
            out["calibration"] = (f"fitted to {len(self.cluster.calibration.runs)} runs of "
                                  f"{self.cluster.calibration.engine}")
        return out

    # ------------------------------------------------------------------ recipes
    def recipe(self, zero: int, dp: int):
        """The memory recipe the training precision runs with at this ZeRO stage and dp."""
        return self.engine.recipe(self.training.precision, zero, dp)

    def dtypes(self, zero: int, dp: int) -> Dtypes:
        """What the recipe computes in (16-bit, fp32 or autocast)."""
        key = (zero, dp > 1)
        hit = self._dtypes.get(key)
        if hit is None:
            hit = self._dtypes[key] = Dtypes.of(self.recipe(zero, dp).compute)
        return hit

    def vocab(self, tp: int) -> int:
        """The vocabulary the engine allocates at this TP degree (padded)."""
        return padded_vocab_size(self.model, tp, self.engine.memory_extras.vocab_multiple)

    def optimizer_seconds_per_param(self, zero: int, dp: int) -> float:
        if self.measured and self.measured.optimizer_s_per_param:
            return self.measured.optimizer_s_per_param
        traffic = self.recipe(zero, dp).optimizer_traffic_bytes * (0.5 if self.training.optimizer == "sgd" else 1)
        return traffic / (self.gpu.hbm_bandwidth * self.gpu.efficiency.memory)

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

    def _pass_cost(self, p, tp_group: Group, dt: Dtypes, host_per_kernel: float) -> PassCost:
        comm = sum(self.net.collective(c.op, c.bytes, tp_group) for c in p.collectives)
        # TP collectives block the stream: they follow the kernels, each issued at the host's cost
        shown = comm * (1.0 - self.engine.overlap.tp_comm_hidden) + len(p.collectives) * self.host_coll
        kernels = pass_time(p, self.gpu, dt.matmul, host_per_kernel, gemm_scale=self.opts.gemm_scale)
        return PassCost(kernels, shown)

    def block(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group, dt: Dtypes) -> BlockCost:
        key = (tp, mbs, sp, recompute, tp_group if self.net.matrix else tp_group.nodes, dt)
        cost = self._blocks.get(key)
        if cost is None:
            m, o = self.model, self.opts
            w = block_work(m, mbs, self.seq, tp, sp, recompute, dt, o)
            fwd = self._pass_cost(w.forward, tp_group, dt, self.host_fwd)
            bwd = self._pass_cost(w.backward, tp_group, dt, self.host_bwd)
            rec = self._pass_cost(w.recompute, tp_group, dt, self.host_fwd)
            acts = block_activation_bytes(m, mbs, self.seq, tp, sp, recompute, dt, o)
            factors = self.measured.block(tp, mbs, recompute) if self.measured else None
            if factors is not None:   # measured kernels; TP collectives stay on the cluster's links
                fwd, bwd, rec = (PassCost(pc.compute * k, pc.comm) for pc, k in
                                 ((fwd, factors.forward), (bwd, factors.backward), (rec, factors.backward)))
                acts *= factors.activations
            cost = self._blocks[key] = BlockCost(
                fwd, bwd, rec, acts, block_backward_transient_bytes(m, mbs, self.seq, tp, sp, recompute, dt, o))
        return cost

    def ends(self, tp: int, mbs: int, sp: bool, tp_group: Group, dt: Dtypes) -> EndsCost:
        key = (tp, mbs, sp, tp_group if self.net.matrix else tp_group.nodes, dt)
        cost = self._ends.get(key)
        if cost is None:
            vocab = self.vocab(tp)
            ef, eb = embedding_work(self.model, mbs, self.seq, tp, sp, dt, vocab)
            hf, hb = head_work(self.model, mbs, self.seq, tp, sp, dt, self.opts, vocab)
            parts = [self._pass_cost(p, tp_group, dt, self.host_bwd if p.backward else self.host_fwd)
                     for p in (ef, eb, hf, hb)]
            if self.measured:
                for i, part in ((0, "embedding"), (2, "head")):
                    factors = self.measured.end(part, tp, mbs)
                    if factors is not None:
                        parts[i] = PassCost(parts[i].compute * factors.forward, parts[i].comm)
                        parts[i + 1] = PassCost(parts[i + 1].compute * factors.backward, parts[i + 1].comm)
            cost = self._ends[key] = EndsCost(*parts)
        return cost

    # ------------------------------------------------------------------ parameters and memory
    def end_params(self, cfg: ParallelConfig, device: int) -> float:
        """Embedding, positions, final norm and LM head parameters one TP rank of `device` holds (elements)."""
        m, tp = self.model, cfg.tp
        emb = self.vocab(tp) * m.hidden_size / tp
        params = 0.0
        if device == 0:
            params += emb + position_params(m)
        if device == cfg.pp - 1:
            params += final_norm_params(m)
            if not m.tied_embeddings or cfg.pp > 1:      # untied head, or the tied copy on the last stage
                params += emb
        return params

    def _embedding_params(self, cfg: ParallelConfig, device: int) -> float:
        """The token and position embedding's parameters on `device` (stage 0's, whose gradients come last)."""
        if device != 0:
            return 0.0
        return self.vocab(cfg.tp) * self.model.hidden_size / cfg.tp + position_params(self.model)

    def device_params(self, cfg: ParallelConfig, device: int, layers: int) -> float:
        """Parameters one TP rank of pipeline device `device` holds (elements)."""
        return layers * self.layer.per_tp_rank(cfg.tp) + self.end_params(cfg, device)

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

    def regime(self, cfg: ParallelConfig, nmb: int) -> Regime:
        ov = self.engine.overlap
        return Regime(zero=cfg.zero, dp=cfg.dp, pp=cfg.pp, optimizer=self.training.optimizer,
                      reshard_after_forward=ov.reshard_after_forward, prefetch=ov.zero3_prefetch,
                      defer_under_pipeline=ov.grad_sync_under_pipeline == "last_microbatch", microbatches=nmb)

    def stage_timeline(self, cfg: ParallelConfig, device: int, chunk_layers: list[int], nmb: int,
                       blk: BlockCost, dt: Dtypes) -> Timeline:
        """Phase peaks of one GPU of pipeline device `device` whose local chunks hold `chunk_layers` blocks."""
        fixed = self._stage_fixed(cfg, device, nmb, blk, dt)
        layers = sum(chunk_layers)
        held = fixed.held_per_chunk
        acts = blk.activation_bytes * sum(n * h for n, h in zip(chunk_layers, held)) + fixed.end_acts_held
        inputs = StageInputs(params=layers * fixed.block_params + fixed.end_params, block_params=fixed.block_params,
                             end_params=fixed.end_params, last_params=fixed.last_params,
                             whole_grad_params=fixed.whole_grad_params, acts_held=acts,
                             acts_one=blk.activation_bytes * layers + fixed.end_acts_one,
                             head_acts=fixed.head_acts, held=max(held),
                             microbatches=nmb, block_transient=blk.transient_bytes,
                             head_transient=fixed.head_transient, head_backward=fixed.head_backward,
                             autocast_copies=layers * fixed.copies_per_block + fixed.end_copies,
                             pipeline_buffers=fixed.pipeline_buffers[0], inflight_outputs=fixed.pipeline_buffers[1])
        return stage_timeline(fixed.recipe, fixed.regime, inputs, fixed.states, fixed.grads_between)

    def _stage_fixed(self, cfg: ParallelConfig, device: int, nmb: int, blk: BlockCost, dt: Dtypes) -> "_StageFixed":
        """What of a device's memory does not depend on its block count (cached: the layer split asks for many
        counts)."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.sp, cfg.schedule, device, nmb,
               blk.activation_bytes)
        hit = self._stage_fixed_cache.get(key)
        if hit is not None:
            return hit
        m, tp, mbs = self.model, cfg.tp, cfg.mbs
        held = self._held(cfg, device, nmb)
        vocab = self.vocab(tp)
        recipe = self.recipe(cfg.zero, cfg.dp)
        fsdp = recipe.gathered_weights_bytes > 0 and cfg.dp > 1 and cfg.zero >= recipe.weights.sharded_from
        end_held = end_one = head_transient = head_backward = end_copies = head_acts = 0.0
        if device == 0:
            emb = embedding_activation_bytes(m, mbs, self.seq, tp, cfg.sp)
            end_held += emb * held[0]
            end_one += emb
        if device == cfg.pp - 1:
            head = head_activation_bytes(m, mbs, self.seq, tp, cfg.sp, dt, self.opts, vocab)
            end_held += head * held[-1]
            end_one += head
            head_acts = head
            head_transient = head_transient_bytes(m, mbs, self.seq, tp, dt, self.opts, vocab)
            head_backward = head_transient_bytes(m, mbs, self.seq, tp, dt, self.opts, vocab, "backward")
            logits = mbs * self.seq * vocab / tp
            if cfg.pp > 1 and self.engine.memory_extras.pipeline_buffers == "all_microbatches":
                head_backward += logits * dt.act         # the stage output kept for the backward
            if tp > 1 and "cross_entropy" not in self.opts.fused:
                head_backward += logits * 4              # loss_parallel's backward: one more fp32 logits tensor
            if dt.autocast and not fsdp:
                end_copies = dt.act * vocab * m.hidden_size / tp          # the LM head is a Linear too
        regime = self.regime(cfg, nmb)
        hit = self._stage_fixed_cache[key] = _StageFixed(
            recipe=recipe, regime=regime, states=state_bytes(recipe, self.training.optimizer, cfg.zero, cfg.dp),
            grads_between=grads_between_bytes(recipe, regime), held_per_chunk=held,
            block_params=self.layer.per_tp_rank(tp),
            end_params=self.end_params(cfg, device), last_params=self._embedding_params(cfg, device),
            end_acts_held=end_held, end_acts_one=end_one, head_acts=head_acts,
            whole_grad_params=(self.vocab(tp) * m.hidden_size * (1 - 1 / tp)
                               if device == 0 and tp > 1 and self.engine.memory_extras.embedding_grad_whole else 0.0),
            head_transient=head_transient, head_backward=head_backward,
            copies_per_block=0.0 if fsdp else autocast_weight_bytes(m, tp, dt), end_copies=end_copies,
            pipeline_buffers=self._pipeline_buffers(cfg, device, nmb, held))
        return hit

    def _pipeline_buffers(self, cfg: ParallelConfig, device: int, nmb: int, held: list[int]) -> tuple[float, float]:
        """(kept, in flight) bytes of a device's pipeline buffers: torch.distributed.pipelining allocates, for each
        local stage, a receive buffer per micro-batch for the activation (not the first stage) and for its
        gradient (not the last) at the first step and keeps them; and it keeps each in-flight micro-batch's
        output for its backward (the last stage's outputs are logits)."""
        if cfg.pp == 1 or self.engine.memory_extras.pipeline_buffers != "all_microbatches":
            return 0.0, 0.0
        msg = self._act_msg(cfg)
        chunks = cfg.pp * cfg.vpp
        dt = self.dtypes(cfg.zero, cfg.dp)
        logits = cfg.mbs * self.seq * self.vocab(cfg.tp) / cfg.tp * dt.act
        kept = in_flight = 0.0
        for local, stage in enumerate(range(device, chunks, cfg.pp)):
            kept += msg * nmb * ((stage > 0) + (stage < chunks - 1))
            if stage < chunks - 1:
                in_flight += msg * held[local]
            else:        # the last stage's outputs are logits; the loss counts the current micro-batch's
                in_flight += logits * max(0, held[local] - 1)
        return kept, in_flight

    def stage_memory(self, cfg: ParallelConfig, device: int, chunk_layers: list[int], nmb: int,
                     blk: BlockCost, dt: Dtypes) -> StageMem:
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule, device,
               tuple(chunk_layers), nmb)
        hit = self._stage_memory_cache.get(key)
        if hit is None:
            t = self.stage_timeline(cfg, device, chunk_layers, nmb, blk, dt)
            peak = t.peak
            hit = self._stage_memory_cache[key] = StageMem(
                sum(chunk_layers), peak.params, peak.grads, peak.optimizer, peak.activations, peak.other,
                t.peak_phase, {k: v.total for k, v in t.phases.items()})
        return hit

    @property
    def capacity(self) -> float:
        """Allocated bytes a GPU may reach: the memory budget over the allocator margin."""
        return self.budget_bytes / self.margin

    # ------------------------------------------------------------------ layer split
    def default_layers(self, cfg: ParallelConfig, blk: BlockCost, ends: EndsCost, dt: Dtypes) -> list[int]:
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
        free = partition_layers(m.num_layers, blk.total, extra)
        cap = self.capacity
        if all(self.stage_memory(cfg, i, [n], nmb, blk, dt).total <= cap for i, n in enumerate(free)):
            return free          # memory does not bind: the unconstrained optimum is the constrained one
        caps = self._device_caps(cfg, nmb, blk, dt)
        return partition_layers(m.num_layers, blk.total, extra, caps=caps) or free

    def _device_caps(self, cfg: ParallelConfig, nmb: int, blk: BlockCost, dt: Dtypes) -> list[int]:
        """The most blocks each pipeline device can hold. The middle devices differ only in the micro-batches
        they keep in flight, which fall with the device index (1F1B; GPipe keeps all), so their caps rise with it:
        where two of them agree, every device between agrees too, and only the devices where the cap changes
        need computing (a few dozen for hundreds of stages)."""
        pp = cfg.pp
        caps: list[int | None] = [None] * pp
        for i in {0, 1, pp - 2, pp - 1}:
            if 0 <= i < pp:
                caps[i] = self._max_blocks(cfg, i, nmb, blk, dt)

        def fill(a: int, b: int) -> None:          # caps[a] and caps[b] known, a < b
            if b - a <= 1:
                return
            if caps[a] == caps[b]:
                caps[a + 1:b] = [caps[a]] * (b - a - 1)
                return
            mid = (a + b) // 2
            caps[mid] = self._max_blocks(cfg, mid, nmb, blk, dt)
            fill(a, mid)
            fill(mid, b)

        if pp > 3:
            fill(1, pp - 2)
        return caps

    def _max_blocks(self, cfg: ParallelConfig, device: int, nmb: int, blk: BlockCost, dt: Dtypes) -> int:
        """The most blocks device `device` can hold within capacity. A stage's peak is the largest of its phase
        peaks, each affine in its block count or the larger of two affine parts: convex and increasing. So
        the chord from a fitting count to the full count stays above it and its crossing of the capacity
        never overshoots; a few chords reach the largest fitting count."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule, device, nmb,
               blk.activation_bytes, blk.transient_bytes)
        hit = self._max_blocks_cache.get(key)       # the layouts of one configuration share their memory
        if hit is None:
            hit = self._max_blocks_cache[key] = self._max_blocks_uncached(cfg, device, nmb, blk, dt)
        return hit

    def _max_blocks_uncached(self, cfg: ParallelConfig, device: int, nmb: int, blk: BlockCost, dt: Dtypes) -> int:
        cap = self.capacity

        def total(n: int) -> float:
            return self.stage_timeline(cfg, device, [n], nmb, blk, dt).peak.total

        hi = self.model.num_layers
        f_hi = total(hi)
        if f_hi <= cap:
            return hi
        lo, f_lo = 0, total(0)
        if f_lo > cap:
            return 0
        while hi - lo > 1:
            guess = lo + int((cap - f_lo) / (f_hi - f_lo) * (hi - lo))   # the chord's crossing, rounded down
            guess = min(max(guess, lo + 1), hi - 1)
            f = total(guess)
            if f <= cap:
                lo, f_lo = guess, f
                if total(guess + 1) > cap:
                    return guess
            else:
                hi, f_hi = guess, f
        return lo

    # ------------------------------------------------------------------ lower bounds for the search
    def bounds(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER) -> tuple[float, float]:
        """(step seconds, peak reserved bytes) that no layer split of `cfg` can beat (see time_bound and
        memory_bound)."""
        return self.time_bound(cfg, order), self.memory_bound(cfg)

    def time_bound(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER) -> float:
        """Step seconds no layer split of `cfg` can beat. With total work W per micro-batch over p devices,
        every schedule's closed form is at least its balanced value, (m + p - 1) W/p, or (m + (p-1)/v) W/p
        interleaved, plus its transfers; data-parallel communication costs at least the overlap slow-down times
        itself (or all of it when not overlapped); the optimizer step of the device with the most parameters
        takes at least that of the average device."""
        layout, tp_group, dp_group = self.layout(cfg.tp, cfg.pp, cfg.dp, order)
        dt = self.dtypes(cfg.zero, cfg.dp)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt)
        work = self._work(cfg, blk, tp_group, dt)
        per_cycle, post = self._state_bounds(cfg, order, dp_group)
        nmb = cfg.microbatches(self.training.global_batch)
        p = cfg.pp
        fill = (p - 1) / cfg.vpp if cfg.schedule == "interleaved" else p - 1
        host = self.engine.host
        c = self._p2p(layout, self._act_msg(cfg)) if p > 1 else 0.0
        transfers = p2p_on_path(cfg.schedule, nmb, p, c, cfg.vpp, self.engine.overlap.pp_p2p == "exposed")
        return (nmb + fill) * (work / p + per_cycle + host.per_microbatch_s) + transfers + post + host.per_step_s

    def memory_bound(self, cfg: ParallelConfig) -> float:
        """Peak reserved bytes no layer split of `cfg` can beat: the forward phase of the fullest stage holds at
        least L / sum_i 1/a_i, a_i = what one more block adds to every stage's forward peak besides activations
        (`_forward_bytes_per_block`) plus its activations times the micro-batches stage i holds (the continuous
        relaxation of the split), with the sum bounded above by an integral."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule)
        hit = self._memory_bound_cache.get(key)
        if hit is None:
            hit = self._memory_bound_cache[key] = self._memory_bound(cfg)
        return hit

    def _memory_bound(self, cfg: ParallelConfig) -> float:
        dt = self.dtypes(cfg.zero, cfg.dp)
        a = self._block_activations(cfg, dt)
        s = self._forward_bytes_per_block(cfg, self.recipe(cfg.zero, cfg.dp))
        nmb = cfg.microbatches(self.training.global_batch)
        p, L = cfg.pp, self.model.num_layers
        if cfg.schedule == "gpipe" and p > 1:
            inv_sum = p / (s + a * nmb)
        else:   # 1F1B holds min(p - i, m); interleaving holds more, so this bound holds for it too
            k = min(p, nmb)
            inv_sum = math.log1p(a * k / s) / a if a > 0 else k / s
            inv_sum += (p - k) / (s + a * k)
        return L / inv_sum * self.margin

    def _block_activations(self, cfg: ParallelConfig, dt: Dtypes) -> float:
        """One block's kept bytes per micro-batch (the TP group's placement does not change them)."""
        key = (cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, dt)
        hit = self._acts_cache.get(key)
        if hit is None:
            one = Group(tuple(range(cfg.tp)), 1)
            hit = self._acts_cache[key] = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, one, dt).activation_bytes
        return hit

    def _work(self, cfg: ParallelConfig, blk: BlockCost, tp_group: Group, dt: Dtypes) -> float:
        """Seconds of all forward and backward work of one micro-batch over the whole model (one TP rank)."""
        key = (cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group if self.net.matrix else tp_group.nodes, dt)
        work = self._work_cache.get(key)
        if work is None:
            ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group, dt)
            work = self._work_cache[key] = (self.model.num_layers * blk.total + ends.emb_fwd.total
                                            + ends.emb_bwd.total + ends.head_fwd.total + ends.head_bwd.total)
        return work

    def _state_bounds(self, cfg: ParallelConfig, order: tuple[str, str, str], dp_group: Group) -> tuple[float, float]:
        """(DP seconds per micro-batch cycle, seconds once per step) for the average device, at least: the parts
        of the time bound that depend only on the degrees and ZeRO."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.zero, order)
        hit = self._state_bounds_cache.get(key)
        if hit is None:
            params = self._total_params_per_tp_rank(cfg) / cfg.pp
            recipe = self.recipe(cfg.zero, cfg.dp)
            kappa = self.cluster.overlap_slowdown
            one_call = lambda op, nbytes: self.net.collective(op, nbytes, dp_group)   # noqa: E731
            comm = stage_dp_comm(self.engine, recipe, cfg.zero, cfg.dp, cfg.pp, params, 0, one_call)
            per_cycle = kappa * (comm.fwd_each + comm.bwd_each)
            once = kappa * (comm.first_fwd + comm.last_bwd) + comm.after
            share = cfg.dp if cfg.zero >= recipe.moments_sharded_from else 1
            once += params / share * self.optimizer_seconds_per_param(cfg.zero, cfg.dp)
            hit = self._state_bounds_cache[key] = (per_cycle, once)
        return hit

    def _forward_bytes_per_block(self, cfg: ParallelConfig, recipe) -> float:
        """Bytes one more block adds to every stage's forward-phase peak besides its activations (states,
        gradients when a backward came first on every stage, gathered or copied weights): the timeline's own
        slope, so the search's memory bound cannot drift from the costing."""
        nmb = cfg.microbatches(self.training.global_batch)
        most_held = max(self._held(cfg, 0, nmb))       # stage 0 holds the most, as the timeline counts them
        key = (cfg.tp, cfg.zero, cfg.dp, cfg.pp > 1, min(nmb, 2), nmb > most_held)
        hit = self._forward_slope_cache.get(key)
        if hit is not None:
            return hit
        dt = self.dtypes(cfg.zero, cfg.dp)
        fsdp = recipe.gathered_weights_bytes > 0 and cfg.dp > 1 and cfg.zero >= recipe.weights.sharded_from
        copies = 0.0 if fsdp else autocast_weight_bytes(self.model, cfg.tp, dt)

        def forward(n: int) -> float:
            block = self.layer.per_tp_rank(cfg.tp)
            inputs = StageInputs(params=n * block, block_params=block, end_params=0.0, last_params=0.0,
                                 whole_grad_params=0.0, acts_held=0.0, acts_one=0.0, head_acts=0.0,
                                 held=most_held, microbatches=nmb, block_transient=0.0, head_transient=0.0,
                                 head_backward=0.0, autocast_copies=n * copies, pipeline_buffers=0.0,
                                 inflight_outputs=0.0)
            return stage_timeline(recipe, self.regime(cfg, nmb), inputs).phases["forward"].total
        hit = self._forward_slope_cache[key] = forward(1) - forward(0)
        return hit

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
        return sum(self.end_params(cfg, i) for i in {0, cfg.pp - 1}) + \
            self.model.num_layers * self.layer.per_tp_rank(cfg.tp)

    # ------------------------------------------------------------------ evaluation
    def _act_msg(self, cfg: ParallelConfig) -> float:
        """Bytes of the activation one micro-batch sends between stages (sequence-sharded under SP)."""
        dt = self.dtypes(cfg.zero, cfg.dp)
        return cfg.mbs * self.seq * self.model.hidden_size * dt.residual / (cfg.tp if cfg.sp else 1)

    def _p2p(self, layout: Layout, nbytes: float) -> float:
        """The slowest activation transfer between neighbouring stages (over every rank pair when measured)."""
        key = (layout, nbytes)
        t = self._p2p_cache.get(key)
        if t is None:
            t = self._p2p_cache[key] = max((self.net.p2p(nbytes, a, b) for a, b in self._stage_pairs(layout)),
                                           default=0.0) + self.host_coll
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

    def dp_comm(self, cfg: ParallelConfig, params: float, layers: int, dp_group: Group) -> DPComm:
        recipe = self.recipe(cfg.zero, cfg.dp)
        return stage_dp_comm(self.engine, recipe, cfg.zero, cfg.dp, cfg.pp, params, layers,
                             lambda op, nbytes: self.net.collective(op, nbytes, dp_group) + self.host_coll,
                             self.dp_calls_per_block)

    def evaluate_core(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                      devices: tuple[int, ...] | None = None) -> Core:
        """Step time, its breakdown and memory per stage of a valid `cfg` (see `evaluate`); `devices` places
        rank r on device devices[r]."""
        m, tr, host = self.model, self.training, self.engine.host
        nmb = cfg.microbatches(tr.global_batch)
        dt = self.dtypes(cfg.zero, cfg.dp)
        layout, tp_group, dp_group = self.layout(cfg.tp, cfg.pp, cfg.dp, order, devices)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt)
        ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group, dt)
        chunks = list(cfg.layers_per_stage) if cfg.layers_per_stage else self.default_layers(cfg, blk, ends, dt)
        pp, last = cfg.pp, cfg.pp - 1
        device_chunks = [chunks[i::pp] for i in range(pp)]
        layers = [sum(c) for c in device_chunks]
        params = [self.device_params(cfg, i, n) for i, n in enumerate(layers)]

        # --- per-device, per-micro-batch times (embedding on the first device, head and loss on the last),
        # with the engine's host cost per micro-batch
        fwd = [n * blk.forward.total + host.per_microbatch_s for n in layers]
        bwd = [n * (blk.backward.total + blk.recompute.total) for n in layers]
        fwd[0] += ends.emb_fwd.total
        bwd[0] += ends.emb_bwd.total
        fwd[last] += ends.head_fwd.total
        bwd[last] += ends.head_bwd.total

        # --- data-parallel communication as the engine issues it, against the compute it overlaps
        kappa = self.cluster.overlap_slowdown
        comms = [self.dp_comm(cfg, params[i], layers[i], dp_group) for i in range(pp)]
        zero_fwd, zero_bwd = [0.0] * pp, [0.0] * pp
        once_first, once_last = [0.0] * pp, [0.0] * pp
        for i, c in enumerate(comms):
            zero_fwd[i] = exposed(c.fwd_each, fwd[i], kappa, c.fwd_piece)
            zero_bwd[i] = exposed(c.bwd_each, bwd[i], kappa, c.bwd_piece)
            once_first[i] = exposed(c.first_fwd, fwd[i] + zero_fwd[i], kappa, c.fwd_piece)
            once_last[i] = exposed(c.last_bwd, bwd[i] + zero_bwd[i], kappa, 0.0 if c.bwd_each else c.bwd_piece)
            fwd[i] += zero_fwd[i]
            bwd[i] += zero_bwd[i]
        every = [f + b for f, b in zip(zero_fwd, zero_bwd)]

        # --- pipeline
        blocking = self.engine.overlap.pp_p2p == "exposed"
        p2p = self._p2p(layout, self._act_msg(cfg)) if pp > 1 else 0.0
        pipe, crit = pipeline_time(cfg.schedule, nmb, fwd, bwd, p2p, cfg.vpp, blocking)

        # --- after each device's last backward (later stages finish theirs earlier, as the last micro-batch's
        # gradient flows back to stage 0): the rest of the gradient reduction, the tied-embedding sync, the
        # optimizer step
        ends_at, slack = [], 0.0
        per_hop = (1.0 / cfg.vpp) if cfg.schedule == "interleaved" else 1.0
        for i in range(pp):
            comm = once_last[i] + comms[i].after
            if m.tied_embeddings and pp > 1 and i in (0, last):
                recipe = self.recipe(cfg.zero, cfg.dp)
                comm += self.net.collective("all_reduce", self.vocab(cfg.tp) * m.hidden_size / cfg.tp
                                            * recipe.reduce_bytes, self._tied_pair(layout))
            share = cfg.dp if cfg.zero >= self.recipe(cfg.zero, cfg.dp).moments_sharded_from else 1
            opt = params[i] / share * self.optimizer_seconds_per_param(cfg.zero, cfg.dp)
            ends_at.append((pipe - slack + comm + opt, comm, opt, i))
            slack += bwd[i] * per_hop + p2p
        finish, post_comm, post_opt, post_dev = max(ends_at)
        first = max(once_first)
        step = finish + first + host.per_step_s
        # what the step spends after the pipeline: the finishing device's communication and optimizer, less the
        # part of it that ran while the pipeline drained
        after = finish - pipe
        if post_comm + post_opt > after > 0:
            post_comm, post_opt = (x * after / (post_comm + post_opt) for x in (post_comm, post_opt))

        # --- time breakdown on the critical path (sums to step)
        n = layers[crit]
        recompute = n * blk.recompute.compute
        tp_comm = n * (blk.forward.comm + blk.backward.comm + blk.recompute.comm)
        for is_end, parts in ((crit == 0, (ends.emb_fwd, ends.emb_bwd)), (crit == last, (ends.head_fwd, ends.head_bwd))):
            if is_end:
                tp_comm += parts[0].comm + parts[1].comm
        compute = fwd[crit] + bwd[crit] - every[crit] - recompute - tp_comm - host.per_microbatch_s
        # what the transfers add to the pipeline (its time less the same schedule with instant transfers)
        transfers = pipe - pipeline_time(cfg.schedule, nmb, fwd, bwd, 0.0, cfg.vpp, blocking)[0] if pp > 1 else 0.0
        time = dict(compute=nmb * compute, recompute=nmb * recompute, tp_comm=nmb * tp_comm, pp_comm=transfers,
                    dp_comm_exposed=nmb * every[crit] + first + post_comm, optimizer=post_opt,
                    host=nmb * host.per_microbatch_s + host.per_step_s)
        time["bubble"] = max(0.0, step - sum(time.values()))

        # --- memory
        stages = [self.stage_memory(cfg, i, device_chunks[i], nmb, blk, dt) for i in range(pp)]
        totals = [s.total for s in stages]
        fullest = max(range(pp), key=totals.__getitem__)
        peak_total = totals[fullest]
        peak_reserved = peak_total * self.margin
        return Core(cfg=cfg, order=order, chunks=chunks, nmb=nmb, step=step, crit=crit, time=time, stages=stages,
                    peak_total=peak_total, peak_reserved=peak_reserved, fullest=fullest,
                    feasible=peak_reserved <= self.budget_bytes, devices=devices,
                    work=StageWork(device_chunks, blk, ends, zero_fwd, zero_bwd, p2p,
                                   [e[1] for e in sorted(ends_at, key=lambda e: e[3])],
                                   [e[2] for e in sorted(ends_at, key=lambda e: e[3])], pipe,
                                   pre_comm=first, host_step=host.per_step_s, blocking_p2p=blocking,
                                   host_microbatch=host.per_microbatch_s))

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
            check_config(self.model, self.cluster, self.training, cfg, self.engine)
        return self.prediction(self.evaluate_core(cfg, order))

    def model_summary(self) -> ModelSummary:
        from planner.cost.params import active_params
        return ModelSummary(name=self.model.name, params=total_params(self.model),
                            active_params=active_params(self.model),
                            attention_kernel=self.model.attention_kernel)

    def prediction(self, core: Core) -> Prediction:
        """The Prediction of an evaluated configuration."""
        m, tr, gpu, cfg = self.model, self.training, self.gpu, core.cfg
        usable, budget = self.usable_bytes, self.budget_bytes
        stages = [StageMemory(stage=i, layers=s.layers, params=round(s.params), grads=round(s.grads),
                              optimizer=round(s.optimizer), activations=round(s.activations), other=round(s.other),
                              total=round(s.total), reserved=round(s.total * self.margin), peak_phase=s.phase,
                              phases={k: round(v) for k, v in s.phase_totals.items()})
                  for i, s in enumerate(core.stages)]
        fullest = stages[core.fullest]
        reason = "" if core.feasible else (
            f"out of memory: stage {fullest.stage} needs {fullest.reserved / GIB:.1f} GiB at its {fullest.peak_phase} "
            f"peak, {(fullest.reserved - budget) / GIB:.1f} GiB more than the {budget / GIB:.1f} GiB budget "
            f"({usable / GIB:.1f} GiB usable less {self.memory_headroom:.0%} headroom)")
        time = TimeBreakdown(**core.time)
        step, gpus = core.step, cfg.tp * cfg.pp * cfg.dp
        dt = self.dtypes(cfg.zero, cfg.dp)
        model_flops = model_flops_per_step(m, tr.global_batch, self.seq)
        hw_flops = hardware_flops_per_step(m, tr.global_batch, self.seq, cfg.recompute == "full",
                                           padded_vocab=self.vocab(cfg.tp))
        predicted = Predicted(
            step_time_s=step, tokens_per_s=tr.tokens_per_step / step,
            mfu=model_flops / (step * gpus * gpu.peak(dt.matmul)),
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
        return Prediction(feasible=core.feasible, reason=reason, engine=self.engine.label(),
                          model=self.model_summary(), config=resolved, predicted=predicted)


def _binding(time: TimeBreakdown, step: float, fullest: StageMemory, budget: float, feasible: bool) -> str:
    """One line: the largest shares of the step and how full the fullest GPU is."""
    shares = sorted(time.model_dump().items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / step:.0%}" for k, v in shares[:3] if v > 0)
    mem = (f"stage {fullest.stage} memory {fullest.reserved / GIB:.1f} of a {budget / GIB:.1f} GiB budget "
           f"({fullest.peak_phase})")
    if not feasible:
        return f"memory: {mem}"
    kind = {"compute": "compute-bound", "recompute": "recompute-heavy", "bubble": "pipeline-bubble-bound",
            "tp_comm": "TP-communication-bound", "pp_comm": "PP-communication-bound",
            "dp_comm_exposed": "DP-communication-bound", "optimizer": "optimizer-bound",
            "host": "host-bound"}[shares[0][0]]
    return f"{kind} ({top}); {mem}" + (" (tight)" if fullest.reserved > 0.95 * budget else "")
