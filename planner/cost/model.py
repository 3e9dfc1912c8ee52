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
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

from planner.cost.comm import Group, Network
from planner.cost.dp_comm import DPComm, stage_dp_comm
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.kernels import (Dtypes, Kernel, KernelOptions, Pass, block_work, device_time, embedding_work,
                                  head_work, kernel_time, launched, parameter_traffic, pass_time)
from planner.cost.measured import MeasuredCosts
from planner.cost.memory import (GIB, autocast_weight_bytes, block_activation_bytes, block_backward_transient_bytes,
                                 embedding_activation_bytes, head_activation_bytes, head_transient_bytes,
                                 in_flight_microbatches, interleaved_in_flight_chunks, state_bytes)
from planner.cost.moe import add_comm, imbalance
from planner.cost.params import (EXPERT_UNIT_TENSORS, LayerParams, final_norm_params, layer_mix, layer_params,
                                 mean_layer_params, norm_tensors, padded_vocab_size, position_params,
                                 sharded_projections, tensors_per_block, total_params)
from planner.cost.pipeline import p2p_on_path
from planner.cost.stage_work import StageWork
from planner.cost.step import DeviceWork, device_times, step_times
from planner.cost.step_split import best_split
from planner.cost.timeline import PhaseMemory, Regime, StageInputs, Timeline, grads_between_bytes, stage_timeline
from planner.engine import EngineSpec, engine_on, load_engine, run_precision as precision_on
from planner.layout import DEFAULT_ORDER, Layout
from planner.parallel_dims import ParallelDims, tied_embedding_pairs
from planner.partition import balanced_layers, partition_layers, spread_over_chunks
from planner.profile_data import ModelProfile
from planner.prediction import (MemoryBreakdown, ModelSummary, Predicted, Prediction, ResolvedConfig, StageMemory,
                                TimeBreakdown)
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec
from planner.validate import check_config

Mix = tuple[tuple[tuple[bool, bool], int], ...]     # layers by kind: ((is MoE, windowed), how many), sorted

# Fraction of the usable memory a plan keeps free. PyTorch's caching allocator leaves on average 15% (up to
# 33%) of its reserved memory unusable in LLM training with recomputation and ZeRO (GMLake, Guo et al.
# ASPLOS'24, arXiv:2401.08156, eight LLMs on A100-80GB); `allocator_margin` already adds 5% of the allocated
# peak, so about 1 - 1.05 * 0.85 ~ 10% more must stay free for the average run (Galvatron keeps 20%).
MEMORY_HEADROOM = 0.10

@dataclass(frozen=True)
class PassCost:
    compute: float     # kernels (and host time the GPU waits for), seconds
    comm: float        # TP and EP collectives not hidden, seconds
    ep: float = 0.0    # of which the expert-parallel all-to-alls

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


class StateTraffic(NamedTuple):
    """What the data-parallel wrapper adds to each block's passes in one micro-batch besides their kernels: bytes
    per parameter element moved on the compute stream (copying all-gathered parameters out of their flat buffer
    before the forward and, parameters resharded after it, the backward; accumulating the weight gradients after
    the backward; copying them into the reduction's buffer, `reduce_copy`) and host seconds of its hooks per block (forward, backward; `moe_hooks_s` for an MoE block, with
    its routed experts' own unit under expert parallelism) and of the unit that wraps the embedding and the head
    (`root_hooks_s`: embedding forward, embedding backward, head forward, head backward)."""

    gather_forward: float = 0.0
    gather_backward: float = 0.0
    accumulate: float = 0.0
    hooks_forward_s: float = 0.0
    hooks_backward_s: float = 0.0
    root_hooks_s: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    moe_hooks_s: tuple[float, float] = (0.0, 0.0)
    reduce_copy: float = 0.0


NO_TRAFFIC = StateTraffic()


def _summed(a: Timeline, b: Timeline) -> Timeline:
    """Two timelines of one device added phase by phase (the dense and the expert parameters' states: each
    phase's peak of the sum is at most the sum of the peaks, so this errs on the full side)."""
    out = {}
    for k, x in a.phases.items():
        y = b.phases[k]
        out[k] = PhaseMemory(x.params + y.params, x.grads + y.grads, x.optimizer + y.optimizer,
                             x.activations + y.activations, x.other + y.other)
    return Timeline(out)


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
        self.host_replay = self.host_fwd * engine.host.recompute_kernel_factor   # per kernel a checkpoint replays
        self.host_coll = engine.host.per_collective_s
        self.net = Network(cluster)
        self.layer = mean_layer_params(model)       # the mean block (dense and MoE layers by their counts)
        self.mix: Mix = tuple(layer_mix(model))
        self.dp_calls_per_block = (tensors_per_block(model, "projections" in engine.fused)
                                   if engine.overlap.dp_calls == "parameter" else 1)
        self.seq = training.seq_len
        self.usable_bytes = self.gpu.memory_bytes - self.gpu.runtime_reserved_bytes
        self.memory_headroom = memory_headroom
        self.budget_bytes = self.usable_bytes * (1.0 - memory_headroom)   # what a feasible plan may reserve
        self.margin = 1.0 + self.gpu.allocator_margin
        measured = (MeasuredCosts(profile, model, training, self.gpu, cluster.backend, self.opts, self.host_fwd,
                                  self.host_bwd, self.host_replay)
                    if profile else None)
        self.sources = self._sources(profile_name, measured)
        self.measured = measured if measured and not measured.mismatch else None
        self._blocks: dict[tuple, BlockCost] = {}
        self._ends: dict[tuple, EndsCost] = {}
        self._plain_kinds: dict[tuple, tuple[BlockCost, tuple]] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._groups: dict[tuple, Group] = {}
        self._held_cache: dict[tuple, list[int]] = {}
        self._hops_cache: dict[tuple, tuple[float, ...]] = {}
        self._pairs_cache: dict[Layout, tuple] = {}
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
        self._block_works: dict[tuple, tuple] = {}
        self._expert_timelines: dict[tuple, Timeline] = {}
        self._expert_state_cache: dict[tuple, tuple] = {}
        self._kind_acts: dict[tuple, float] = {}
        self._timelines: dict[tuple, Timeline] = {}
        self._mix_params: dict[Mix, LayerParams] = {}
        self._range_mixes: dict[tuple[int, int], Mix] = {}

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
    @property
    def run_precision(self) -> str:
        """The precision the steps compute in: the training's, but fp32 on CPUs (a gloo cluster)."""
        return precision_on(self.training.precision, "cpu" if self.cluster.backend == "gloo" else "cuda")

    def recipe(self, zero: int, dp: int):
        """The memory recipe the run precision runs with at this ZeRO stage and dp."""
        return self.engine.recipe(self.run_precision, zero, dp)

    def dtypes(self, zero: int, dp: int) -> Dtypes:
        """What the recipe computes in (16-bit, fp32 or autocast)."""
        key = (zero, dp > 1)
        hit = self._dtypes.get(key)
        if hit is None:
            hit = self._dtypes[key] = Dtypes.of(self.recipe(zero, dp).compute)
        return hit

    def state_traffic(self, cfg: ParallelConfig, nmb: int) -> StateTraffic:
        """What one micro-batch of `cfg` moves over its parameters on the compute stream (StateTraffic): FSDP2's
        copy out of each gathered buffer (a read and a write of the gathered dtype) before the forward, and before
        the backward when ZeRO-3 resharded after the forward; the gradients' accumulation."""
        recipe = self.recipe(cfg.zero, cfg.dp)
        gathered = (self.engine.kernels.gather_copy_out and cfg.dp > 1 and cfg.zero >= 1
                    and cfg.zero >= recipe.weights.sharded_from)
        copy = 2 * recipe.gather_bytes if gathered else 0.0
        again = copy if cfg.zero >= 3 and self.engine.overlap.reshard_after_forward else 0.0
        moe = self.hook_seconds(cfg, moe_layer=True) if self.model.moe is not None else (0.0, 0.0)
        return StateTraffic(copy, again, self.accumulation_bytes(cfg, nmb), *self.hook_seconds(cfg),
                            self.root_hook_seconds(cfg), moe, self.reduce_copy_bytes(cfg, nmb))

    def hook_seconds(self, cfg: ParallelConfig, moe_layer: bool = False) -> tuple[float, float]:
        """Host seconds of the data-parallel wrapper's hooks around one block's (forward, backward) pass
        (engine.host.fsdp_hooks, per wrapped block; none without data parallelism). Under expert parallelism an
        MoE block's routed experts are a unit of their own (runtime/parallelize.py), whose hooks run too."""
        hooks = self.engine.host.fsdp_hooks
        stage = hooks.for_stage(cfg.zero, self.engine.overlap.reshard_after_forward) if hooks and cfg.dp > 1 else None
        if stage is None:
            return 0.0, 0.0
        apart = moe_layer and cfg.ep > 1
        block = stage.seconds(tensors_per_block(self.model, "projections" in self.opts.fused, moe_layer, apart))
        if not apart:
            return block
        experts = stage.seconds(EXPERT_UNIT_TENSORS)
        return block[0] + experts[0], block[1] + experts[1]

    def root_hook_seconds(self, cfg: ParallelConfig) -> tuple[float, float, float, float]:
        """Host seconds of the hooks of the unit wrapping a pipeline stage's own parameters (the embedding, the
        final norm and the head; kept gathered, as runtime/parallelize.py wraps each stage's chunk) per micro-batch:
        (embedding forward, embedding backward, head forward, head backward). One unit holds both ends without
        pipelining (its hooks priced with the embedding's passes); a stage without end parameters has none."""
        hooks = self.engine.host.fsdp_hooks
        unit = hooks.for_stage(cfg.zero, reshard_after_forward=False) if hooks and cfg.dp > 1 else None
        if unit is None:
            return 0.0, 0.0, 0.0, 0.0
        embedding, head = self.end_tensors(cfg)
        if cfg.pp == 1:
            return (*unit.seconds(embedding + head), 0.0, 0.0)
        return (*unit.seconds(embedding), *unit.seconds(head))

    def end_tensors(self, cfg: ParallelConfig) -> tuple[int, int]:
        """Parameter tensors of the embedding (tokens, learned positions) and of the head (final norm, and the
        output projection unless tied to the embedding on the same stage)."""
        m = self.model
        embedding = 1 + (1 if position_params(m) else 0)
        return embedding, norm_tensors(m) + (0 if m.tied_embeddings and cfg.pp == 1 else 1)

    def accumulation_bytes(self, cfg: ParallelConfig, nmb: int) -> float:
        """Bytes per weight-gradient element one micro-batch's backward moves, on average over the step, to add
        its gradients to their accumulator (engine.kernels.grad_accumulation): the fresh 16-bit (fp32 under
        autocast or fp32) gradient read, the accumulator read and written; every micro-batch with a hook, all but
        the first with autograd; none when fused into the weight-gradient GEMM or when the gradients are
        reduce-scattered every micro-batch (their 1/dp shards accumulate, neglected)."""
        mode = self.engine.kernels.grad_accumulation
        if mode == "fused" or (mode == "autograd" and nmb == 1):
            return 0.0
        recipe, dt = self.recipe(cfg.zero, cfg.dp), self.dtypes(cfg.zero, cfg.dp)
        defers = cfg.pp > 1 and self.engine.overlap.grad_sync_under_pipeline == "last_microbatch"
        sharded = cfg.dp > 1 and cfg.zero >= recipe.grads.sharded_from
        if sharded and (nmb == 1 or (cfg.zero >= 2 and not defers)):
            return 0.0
        accumulator = (recipe.accumulated_grads_bytes or recipe.grads.bytes) if sharded else recipe.grads.bytes
        share = 1.0 if mode == "hook" else (nmb - 1) / nmb
        return (dt.residual + 2 * accumulator) * share      # the fresh gradient: the parameters' compute dtype

    def reduce_copy_bytes(self, cfg: ParallelConfig, nmb: int) -> float:
        """Bytes per weight-gradient element one micro-batch's backward moves, on average over the step, copying
        the gradients into the flat buffer they are reduced from (engine.kernels.reduce_copy_in: FSDP2's chunk_cat,
        torch _fsdp_collectives.foreach_reduce): the gradient read (the fresh one when every micro-batch reduces,
        ZeRO-2/3 as dp_comm.py times it; else the accumulator, once per step) and the reduction's dtype written."""
        if not (self.engine.kernels.reduce_copy_in and cfg.dp > 1):
            return 0.0
        recipe, dt = self.recipe(cfg.zero, cfg.dp), self.dtypes(cfg.zero, cfg.dp)
        defers = cfg.pp > 1 and self.engine.overlap.grad_sync_under_pipeline == "last_microbatch"
        if (cfg.zero >= 2 and not defers) or nmb == 1:
            return dt.residual + recipe.reduce_bytes          # every micro-batch: its own fresh gradient
        accumulator = recipe.accumulated_grads_bytes or recipe.grads.bytes
        return (accumulator + recipe.reduce_bytes) / nmb

    def vocab(self, tp: int) -> int:
        """The vocabulary the engine allocates at this TP degree (padded)."""
        return padded_vocab_size(self.model, tp, self.engine.memory_extras.vocab_multiple)

    def optimizer_seconds_per_param(self, zero: int, dp: int) -> float:
        if self.measured and self.measured.optimizer_s_per_param:
            return self.measured.optimizer_s_per_param
        traffic = self.recipe(zero, dp).optimizer_traffic_bytes * (0.5 if self.training.optimizer == "sgd" else 1)
        return traffic / (self.gpu.hbm_bandwidth * self.gpu.efficiency.memory)

    # ------------------------------------------------------------------ cached pieces
    def layout(self, dims: ParallelDims, devices: tuple[int, ...] | None = None) -> Layout:
        """The ranks of `dims` on the cluster's devices (rank r on device r unless `devices` says otherwise)."""
        key = (dims, devices)
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = Layout(dims, self.cluster.gpus_per_node, devices)
        return hit

    def group(self, dims: ParallelDims, dim: str, devices: tuple[int, ...] | None = None) -> Group:
        """The group along `dim` ('tp', 'dp', 'pp', 'ep', 'edp') through rank 0, with every parallel group along
        it as its peers when links are measured (the slowest one sets the pace)."""
        key = (dims, dim, devices)
        hit = self._groups.get(key)
        if hit is None:
            hit = self._groups[key] = self.layout(dims, devices).group(dim, self.net.matrix is not None)
        return hit

    def _pass_cost(self, p, tp_group: Group, dt: Dtypes, host_per_kernel: float,
                   ep_group: Group | None = None) -> PassCost:
        ov = self.engine.overlap
        tp_comm = sum(self.net.collective(c.op, c.bytes, tp_group) for c in p.collectives if c.group == "tp")
        ep_comm = sum(self.net.collective(c.op, c.bytes, ep_group) for c in p.collectives if c.group == "ep")
        # collectives block the stream: they follow the kernels, each issued at the host's cost
        shown = (tp_comm * (1.0 - ov.tp_comm_hidden) + ep_comm * (1.0 - ov.ep_comm_hidden)
                 + len(p.collectives) * self.host_coll)
        kernels = pass_time(p, self.gpu, dt.matmul, host_per_kernel, gemm_scale=self.opts.gemm_scale)
        return PassCost(kernels, shown, ep_comm * (1.0 - ov.ep_comm_hidden))

    def _with_traffic(self, cost: PassCost, p: Pass, host_per_kernel: float, dt: Dtypes, added: list[Kernel],
                      issued: tuple[float, float] | None = None, hooks_s: float = 0.0) -> PassCost:
        """`cost` of pass `p` with the `added` kernels after its own and `hooks_s` more host seconds: the time they
        add to the pass as priced (device against host); `issued`: p's (device, host) seconds when known."""
        if not added and not hooks_s:
            return cost
        device, host = issued or (device_time(p, self.gpu, dt.matmul, self.opts.gemm_scale),
                                  len(p.kernels) * host_per_kernel)
        more = sum(kernel_time(k, self.gpu, dt.matmul, self.opts.gemm_scale) for k in added)
        extra = (launched(device + more, host + len(added) * host_per_kernel + hooks_s, self.gpu)
                 - launched(device, host, self.gpu))
        return PassCost(cost.compute + extra, cost.comm, cost.ep)

    def block(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group, dt: Dtypes, ep: int = 1,
              ep_group: Group | None = None, mix: Mix | None = None, traffic: StateTraffic = NO_TRAFFIC) -> BlockCost:
        """The mean block of the model, or of the layers `mix` counts (one device's: `device_mixes`): each kind of
        layer (dense or MoE, global or windowed attention) weighted by its count; its backward working set is
        the largest kind's. `traffic`: what its parameters' gathers and gradients add (`state_traffic`; none: a
        lower bound)."""
        where = (lambda g: g if self.net.matrix else (g.nodes if g is not None else None))   # noqa: E731
        mix = mix or self.mix
        key = (tp, mbs, sp, recompute, where(tp_group), dt, ep, where(ep_group), mix, traffic)
        cost = self._blocks.get(key)
        if cost is None:
            kinds = []
            for (moe, win), n in mix:
                kind_key = key[:-2] + (moe, win, traffic)
                one = self._blocks.get(kind_key)
                if one is None:
                    one = self._blocks[kind_key] = self._block_kind(tp, mbs, sp, recompute, tp_group, dt, ep,
                                                                    ep_group, moe, win, traffic)
                kinds.append((one, n))
            L = sum(n for _, n in mix)

            def mean(get) -> PassCost:
                return PassCost(*(sum(getattr(get(c), f) * n for c, n in kinds) / L for f in ("compute", "comm", "ep")))
            cost = self._blocks[key] = BlockCost(
                mean(lambda c: c.forward), mean(lambda c: c.backward), mean(lambda c: c.recompute),
                sum(c.activation_bytes * n for c, n in kinds) / L, max(c.transient_bytes for c, _ in kinds))
        return cost

    def _block_kind(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group, dt: Dtypes, ep: int,
                    ep_group: Group | None, moe: bool, windowed: bool, traffic: StateTraffic = NO_TRAFFIC) -> BlockCost:
        plain, issued = self._plain_kind(tp, mbs, sp, recompute, tp_group, dt, ep, ep_group, moe, windowed)
        tp_host = (self.engine.tp_host_seconds(sharded_projections(self.model, "projections" in self.opts.fused, moe),
                                               sp) if tp > 1 else (0.0, 0.0))
        w = self._block_work(tp, mbs, sp, recompute, dt, ep, moe, windowed)[0]
        # entering the block's checkpointed region (one per block: the block, or its attention core)
        checkpoint = self.engine.host.checkpoint_forward_s if w.recompute.kernels else 0.0
        if traffic == NO_TRAFFIC and not any(tp_host) and not checkpoint:
            return plain
        # added to the priced passes (after a profile's factors: it times one pass without them)
        params = layer_params(self.model, moe).per_tp_rank(tp, ep)
        tensors = tensors_per_block(self.model, "projections" in self.opts.fused, moe)
        hooks = traffic.moe_hooks_s if moe else (traffic.hooks_forward_s, traffic.hooks_backward_s)
        hooks = (hooks[0] + tp_host[0] + checkpoint, hooks[1] + tp_host[1])
        fwd = self._with_traffic(plain.forward, w.forward, self.host_fwd, dt,
                                 parameter_traffic(params, 1, traffic.gather_forward), issued[0], hooks[0])
        bwd = self._with_traffic(plain.backward, w.backward, self.host_bwd, dt,
                                 parameter_traffic(params, 1, traffic.gather_backward)
                                 + parameter_traffic(params, tensors, traffic.accumulate)
                                 + parameter_traffic(params, 1, traffic.reduce_copy), issued[1], hooks[1])
        rec = plain.recompute        # full recomputation runs the forward's sharded projections again
        if recompute == "full" and tp_host[0]:
            rec = self._with_traffic(rec, w.recompute, self.host_fwd, dt, [], hooks_s=tp_host[0])
        return replace(plain, forward=fwd, backward=bwd, recompute=rec)

    def _plain_kind(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group, dt: Dtypes, ep: int,
                    ep_group: Group | None, moe: bool, windowed: bool) -> tuple[BlockCost, tuple]:
        """One kind of block without its parameters' traffic, and its forward's and backward's (device, host)
        seconds (cached)."""
        where = (lambda g: g if self.net.matrix else (g.nodes if g is not None else None))   # noqa: E731
        key = (tp, mbs, sp, recompute, where(tp_group), dt, ep, where(ep_group), moe, windowed)
        hit = self._plain_kinds.get(key)
        if hit is not None:
            return hit
        w, acts, transient = self._block_work(tp, mbs, sp, recompute, dt, ep, moe, windowed)
        fwd = self._pass_cost(w.forward, tp_group, dt, self.host_fwd, ep_group)
        bwd = self._pass_cost(w.backward, tp_group, dt, self.host_bwd, ep_group)
        rec = self._pass_cost(w.recompute, tp_group, dt, self.host_replay, ep_group)
        factors = self.measured.block(tp, mbs, recompute, moe) if self.measured else None
        if factors is not None:   # measured kernels; TP collectives stay on the cluster's links
            fwd, bwd, rec = (PassCost(pc.compute * k, pc.comm, pc.ep) for pc, k in
                             ((fwd, factors.forward), (bwd, factors.backward), (rec, factors.backward)))
        issued = tuple((device_time(p, self.gpu, dt.matmul, self.opts.gemm_scale), len(p.kernels) * host)
                       for p, host in ((w.forward, self.host_fwd), (w.backward, self.host_bwd)))
        hit = self._plain_kinds[key] = (BlockCost(fwd, bwd, rec, acts, transient), issued)
        return hit

    def _block_work(self, tp: int, mbs: int, sp: bool, recompute: str, dt: Dtypes, ep: int, moe: bool,
                    windowed: bool) -> tuple:
        """(kernels and collectives, kept bytes, backward working set) of one kind of block (cached: they do not
        depend on where the groups are placed)."""
        key = (tp, mbs, sp, recompute, dt, ep, moe, windowed)
        hit = self._block_works.get(key)
        if hit is None:
            m, o = self.model, self.opts
            load = imbalance(m, self.training, ep) if moe else 1.0
            hit = self._block_works[key] = (
                block_work(m, mbs, self.seq, tp, sp, recompute, dt, o, moe, windowed, ep, load),
                self._kind_activations(tp, mbs, sp, recompute, dt, ep, moe),
                block_backward_transient_bytes(m, mbs, self.seq, tp, sp, recompute, dt, o, moe, load))
        return hit

    def _kind_activations(self, tp: int, mbs: int, sp: bool, recompute: str, dt: Dtypes, ep: int, moe: bool) -> float:
        """Bytes one kind of block keeps for its backward (measured factors applied), cached."""
        key = (tp, mbs, sp, recompute, dt, ep if moe else 1, moe)
        hit = self._kind_acts.get(key)
        if hit is None:
            load = imbalance(self.model, self.training, ep) if moe else 1.0
            hit = block_activation_bytes(self.model, mbs, self.seq, tp, sp, recompute, dt, self.opts, moe, load)
            factors = self.measured.block(tp, mbs, recompute, moe) if self.measured else None
            if factors is not None:
                hit *= factors.activations
            self._kind_acts[key] = hit
        return hit

    def ends(self, tp: int, mbs: int, sp: bool, tp_group: Group, dt: Dtypes, head_shared: bool = False,
             traffic: StateTraffic = NO_TRAFFIC) -> EndsCost:
        """The embedding's and the head's passes; `head_shared`: the head is the embedding's tied weight, held once;
        `traffic` (StateTraffic): the bytes per parameter element their forward copies out of a gathered buffer
        (gather_forward: the embedding and the head are gathered once per micro-batch, kept for the backward), their
        backward copies into the reduction's buffer (reduce_copy), and their wrapper's hooks per pass
        (root_hooks_s)."""
        copy, root_hooks, reduce_copy = traffic.gather_forward, traffic.root_hooks_s, traffic.reduce_copy
        key = (tp, mbs, sp, tp_group if self.net.matrix else tp_group.nodes, dt, copy, head_shared, root_hooks,
               reduce_copy)
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
            m, emb = self.model, vocab * self.model.hidden_size / tp
            first, head = emb + position_params(m), final_norm_params(m) + (0.0 if head_shared else emb)
            added = {0: parameter_traffic(first, 1, copy), 1: parameter_traffic(first, 1, reduce_copy),
                     2: parameter_traffic(head, 1, copy), 3: parameter_traffic(head, 1, reduce_copy)}
            for i, p in enumerate((ef, eb, hf, hb)):
                if added[i] or root_hooks[i]:
                    parts[i] = self._with_traffic(parts[i], p, self.host_bwd if p.backward else self.host_fwd, dt,
                                                  added[i], hooks_s=root_hooks[i])
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

    def device_params(self, cfg: ParallelConfig, device: int, layers: int, mix: Mix | None = None) -> float:
        """Parameters one TP rank of pipeline device `device` holds that are reduced over the whole data-parallel
        group: all but the routed experts (elements). `mix`: the device's own layers (default: mean blocks)."""
        return layers * self.block_params(cfg, mix) + self.end_params(cfg, device)

    def layer_params(self, mix: Mix | None = None) -> LayerParams:
        """The mean block's parameters, of the model or of the layers `mix` counts (cached)."""
        if not mix:
            return self.layer
        hit = self._mix_params.get(mix)
        if hit is None:
            hit = self._mix_params[mix] = mean_layer_params(self.model, mix)
        return hit

    def block_params(self, cfg, mix: Mix | None = None) -> float:
        """Parameters of the mean block one TP rank holds that are reduced over the whole data-parallel group:
        without expert parallelism the routed experts too (their states then follow the dense ones exactly)."""
        layer = self.layer_params(mix)
        return layer.dense_per_tp_rank(cfg.tp) + (layer.experts / cfg.tp if cfg.ep == 1 else 0.0)

    def has_experts(self, cfg) -> bool:
        """Whether `cfg` shards routed experts over an EP group (their states then follow dp/ep ranks)."""
        return cfg.ep > 1 and self.layer.experts > 0

    def expert_params(self, cfg, layers: int, mix: Mix | None = None) -> float:
        """Routed-expert parameters one rank holds in `layers` (mean) blocks under expert parallelism: its E/ep
        experts' TP shards (0 without: `block_params` counts them)."""
        return layers * self.layer_params(mix).experts / (cfg.tp * cfg.ep) if cfg.ep > 1 else 0.0

    def device_mixes(self, chunks: list[int], pp: int) -> list[Mix] | None:
        """Each pipeline device's layers by kind, `layer_mix`'s form, from the block counts of the virtual stages
        in model order (virtual stage v on device v mod pp); None when all the model's layers are alike."""
        if len(self.mix) == 1:
            return None
        counts: list[dict] = [dict() for _ in range(pp)]
        start = 0
        for v, n in enumerate(chunks):
            for kind, k in self.range_mix(start, n):
                counts[v % pp][kind] = counts[v % pp].get(kind, 0) + k
            start += n
        return [tuple(sorted(c.items())) for c in counts]

    def range_mix(self, first: int, n: int) -> Mix:
        """The kinds of the model's blocks first .. first + n - 1, `layer_mix`'s form (cached)."""
        hit = self._range_mixes.get((first, n))
        if hit is None:
            m, counts = self.model, {}
            for i in range(first, first + n):
                key = (m.moe is not None and m.moe.is_moe_layer(i), m.is_windowed_layer(i))
                counts[key] = counts.get(key, 0) + 1
            hit = self._range_mixes[(first, n)] = tuple(sorted(counts.items()))
        return hit

    def _expert_regime(self, cfg, nmb: int) -> Regime:
        """The regime of the expert parameters: ZeRO over the expert-data-parallel group (dp/ep ranks)."""
        return replace(self.regime(cfg, nmb), dp=cfg.dp // cfg.ep)

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
                       blk: BlockCost, dt: Dtypes, mix: Mix | None = None) -> Timeline:
        """Phase peaks of one GPU of pipeline device `device` whose local chunks hold `chunk_layers` blocks, `blk`
        and the parameters of `mix` each (default: mean blocks) (cached: the layer split asks for many counts, and
        rank orders of one configuration share their memory)."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.vpp, cfg.mbs, cfg.zero, cfg.sp, cfg.schedule, device, nmb,
               blk.activation_bytes, blk.transient_bytes, tuple(chunk_layers), mix)
        hit = self._timelines.get(key)
        if hit is None:
            hit = self._timelines[key] = self._stage_timeline(cfg, device, chunk_layers, nmb, blk, dt, mix)
        return hit

    def _stage_timeline(self, cfg: ParallelConfig, device: int, chunk_layers: list[int], nmb: int,
                        blk: BlockCost, dt: Dtypes, mix: Mix | None) -> Timeline:
        fixed = self._stage_fixed(cfg, device, nmb, blk, dt, mix)
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
        dense = stage_timeline(fixed.recipe, fixed.regime, inputs, fixed.states, fixed.grads_between)
        if not self.has_experts(cfg):
            return dense
        return _summed(dense, self._expert_timeline(cfg, layers, nmb, fixed, mix))

    def _expert_timeline(self, cfg, layers: int, nmb: int, fixed: "_StageFixed", mix: Mix | None) -> Timeline:
        """The routed experts' states over a step: the same recipe with ZeRO over the expert-data-parallel group,
        no activations of their own (the blocks' activations count the routed tokens)."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.zero, nmb, max(fixed.held_per_chunk), layers, mix)
        hit = self._expert_timelines.get(key)
        if hit is not None:
            return hit
        block = self.expert_params(cfg, 1, mix)
        inputs = StageInputs(params=layers * block, block_params=block, end_params=0.0, last_params=0.0,
                             whole_grad_params=0.0, acts_held=0.0, acts_one=0.0, head_acts=0.0, held=max(fixed.held_per_chunk),
                             microbatches=nmb, block_transient=0.0, head_transient=0.0, head_backward=0.0,
                             autocast_copies=0.0, pipeline_buffers=0.0, inflight_outputs=0.0)
        regime, sb, between = self._expert_states(cfg, nmb, fixed.recipe)
        hit = self._expert_timelines[key] = stage_timeline(fixed.recipe, regime, inputs, sb, between)
        return hit

    def _expert_states(self, cfg, nmb: int, recipe) -> tuple[Regime, object, float]:
        """(regime, state bytes, gradient bytes held between backwards) of the expert parameters (cached)."""
        key = (cfg.zero, cfg.dp, cfg.ep, cfg.pp, nmb, id(recipe))      # recipes live as long as the engine
        hit = self._expert_state_cache.get(key)
        if hit is None:
            regime = self._expert_regime(cfg, nmb)
            hit = self._expert_state_cache[key] = (regime, state_bytes(recipe, self.training.optimizer, cfg.zero,
                                                                       regime.dp), grads_between_bytes(recipe, regime))
        return hit

    def _stage_fixed(self, cfg: ParallelConfig, device: int, nmb: int, blk: BlockCost, dt: Dtypes,
                     mix: Mix | None = None) -> "_StageFixed":
        """What of a device's memory does not depend on its block count (cached: the layer split asks for many
        counts)."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.vpp, cfg.mbs, cfg.zero, cfg.sp, cfg.schedule, device, nmb,
               blk.activation_bytes, mix)
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
                head_transient += logits * 4             # loss_parallel's forward: logits - max beside the logits
                head_backward += logits * 4              # loss_parallel's backward: one more fp32 logits tensor
            if dt.autocast and not fsdp:
                end_copies = dt.act * vocab * m.hidden_size / tp          # the LM head is a Linear too
        regime = self.regime(cfg, nmb)
        hit = self._stage_fixed_cache[key] = _StageFixed(
            recipe=recipe, regime=regime, states=state_bytes(recipe, self.training.optimizer, cfg.zero, cfg.dp),
            grads_between=grads_between_bytes(recipe, regime), held_per_chunk=held,
            block_params=self.block_params(cfg, mix),
            end_params=self.end_params(cfg, device), last_params=self._embedding_params(cfg, device),
            end_acts_held=end_held, end_acts_one=end_one, head_acts=head_acts,
            whole_grad_params=(self.vocab(tp) * m.hidden_size * (1 - 1 / tp)
                               if device == 0 and tp > 1 and self.engine.memory_extras.embedding_grad_whole else 0.0),
            head_transient=head_transient, head_backward=head_backward,
            copies_per_block=0.0 if fsdp else autocast_weight_bytes(m, tp, dt, cfg.ep, self.layer_params(mix)),
            end_copies=end_copies,
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
                     blk: BlockCost, dt: Dtypes, mix: Mix | None = None) -> StageMem:
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule,
               device, tuple(chunk_layers), nmb, mix)
        hit = self._stage_memory_cache.get(key)
        if hit is None:
            t = self.stage_timeline(cfg, device, chunk_layers, nmb, blk, dt, mix)
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
    def default_layers(self, cfg: ParallelConfig, blk: BlockCost, ends: EndsCost, dt: Dtypes,
                       work: Callable[[int, int], DeviceWork], hops: tuple[float, ...], blocking: bool,
                       work_at: Callable[[int, int, int], DeviceWork] | None = None) -> list[int]:
        """Blocks per chunk under every device's memory (falling back to time alone when nothing fits): the
        split with the least step, data-parallel exposure and optimizer included (planner.cost.step_split),
        searched from a time-only one. 1F1B and GPipe start from the min-max split of `partition_layers`.
        Interleaved starts from near-equal chunks when they fit, else from the min-max split of each device's
        blocks under its memory, at least one per chunk; the search picks blocks per device, at least one per chunk, spread near-equally
        over its chunks by `spread_over_chunks` (the step's closed form counts a device's total; the schedule
        wants its chunks alike), and keeps the start unless a split beats it (unsearched when its totals do not
        fit spread). `work(i, n)`: device i holding n blocks; hops, blocking:
        its transfers (seconds on each hop, whether they block the stages); `work_at(i, first, n)`: device i
        holding the blocks from `first` on, for a model whose blocks differ (1F1B and GPipe are then searched
        with each device's own blocks, interleaved pipelines with mean blocks)."""
        m, chunks = self.model, cfg.pp * cfg.vpp
        if self.engine.layer_split == "balanced":         # the engine splits the blocks itself
            return balanced_layers(m.num_layers, chunks)
        nmb = cfg.microbatches(self.training.global_batch)
        most = None       # every device's most blocks, once known
        if cfg.vpp > 1 or cfg.pp == 1:
            # near-equal chunks; the remainder goes to the chunks without the embedding or the head
            base, rest = divmod(m.num_layers, chunks)
            order = list(range(1, chunks - 1)) + [0, chunks - 1] if chunks > 2 else list(range(chunks))
            split = [base] * chunks
            for j in order[:rest]:
                split[j] += 1
            if cfg.pp == 1:
                return split
            if not self._split_fits(cfg, split, nmb, blk, dt):
                fitting = self._interleaved_split(cfg, nmb, blk, ends, dt)
                if fitting is None:
                    return split
                split, most = fitting, self._device_caps(cfg, nmb, blk, dt)
            start = [sum(split[i::cfg.pp]) for i in range(cfg.pp)]
        else:
            extra = self._ends_per_device(cfg, ends)
            split = partition_layers(m.num_layers, blk.total, extra)
            if not self._split_fits(cfg, split, nmb, blk, dt):   # else the unconstrained optimum is the constrained one
                most = self._device_caps(cfg, nmb, blk, dt)
                fitting = partition_layers(m.num_layers, blk.total, extra, caps=most)
                if fitting is None:
                    return split
                split = fitting
            start = split
        ov, host, pp, cap = self.engine.overlap, self.engine.host, cfg.pp, self.capacity
        last = pp - 1

        seen: dict[tuple[bool, bool, int], tuple] = {}

        def times(i: int, n: int):
            key = (i == 0, i == last, n)       # devices other than the first and the last are alike
            hit = seen.get(key)
            if hit is None:
                w = work(i, n)
                hit = seen[key] = (device_times(w, i == 0, i == last, self.dp_overlap_slowdown(cfg.zero),
                                                host.per_microbatch_s, ov.gather_window), w.optimizer)
            return hit

        fit_from: dict[int, int] = {}     # blocks -> the first middle device known to hold them

        def fits(i: int, n: int) -> bool:
            if most is not None:
                return n <= most[i]
            # middle devices keep fewer micro-batches in flight the later they are (see _device_caps): those after
            # one that holds n blocks hold them too
            middle = 0 < i < last
            if middle and i >= fit_from.get(n, pp):
                return True
            ok = self.stage_memory(cfg, i, spread_over_chunks(n, cfg.vpp), nmb, blk, dt).total <= cap
            if ok and middle:
                fit_from[n] = min(i, fit_from.get(n, pp))
            return ok

        if cfg.vpp > 1 and not all(n >= cfg.vpp and fits(i, n) for i, n in enumerate(start)):
            return split      # the start's totals do not fit spread: no bound to search from
        extra = [x + host.per_microbatch_s for x in self._ends_per_device(cfg, ends)]
        floor, positional = blk.total, work_at is not None and cfg.vpp == 1
        if positional:        # each device's own blocks, from the index of its first one
            seen_at: dict[tuple, tuple] = {}

            def times_at(i: int, first: int, n: int):
                key = (i == 0, i == last, self.range_mix(first, n))
                hit = seen_at.get(key)
                if hit is None:
                    w = work_at(i, first, n)
                    hit = seen_at[key] = (device_times(w, i == 0, i == last, self.dp_overlap_slowdown(cfg.zero),
                                                       host.per_microbatch_s, ov.gather_window), w.optimizer)
                return hit

            fit_from_mix: dict[Mix, int] = {}      # blocks -> the first middle device known to hold them

            def fits_at(i: int, first: int, n: int) -> bool:
                mix = self.range_mix(first, n)
                middle = 0 < i < last              # later middle devices keep fewer micro-batches (as `fits`)
                if middle and i >= fit_from_mix.get(mix, pp):
                    return True
                ok = self.stage_memory(cfg, i, [n], nmb, work_at(i, first, n).block, dt, mix).total <= cap
                if ok and middle:
                    fit_from_mix[mix] = min(i, fit_from_mix.get(mix, pp))
                return ok
            first_of = {}                      # the first block of each kind
            for i in range(m.num_layers):
                first_of.setdefault(self.range_mix(i, 1), i)
            floor = min(work_at(0, i, 1).block.total for i in first_of.values())   # the lightest kind's block
        totals = best_split(cfg.schedule, cfg.vpp, m.num_layers, nmb, start, times_at if positional else times,
                            fits_at if positional else fits, hops, blocking, host.per_step_s, floor, extra,
                            least=cfg.vpp, blocks_key=self.range_mix if positional else None)
        if totals == start:
            return split
        per_device = [spread_over_chunks(n, cfg.vpp) for n in totals]
        return [per_device[j % pp][j // pp] for j in range(chunks)]

    @staticmethod
    def _ends_per_device(cfg: ParallelConfig, ends: EndsCost) -> list[float]:
        """Seconds per micro-batch each pipeline device spends outside its blocks: embedding first, head last."""
        extra = [0.0] * cfg.pp
        extra[0] += ends.emb_fwd.total + ends.emb_bwd.total
        extra[-1] += ends.head_fwd.total + ends.head_bwd.total
        return extra

    def _split_fits(self, cfg: ParallelConfig, chunks: list[int], nmb: int, blk: BlockCost, dt: Dtypes) -> bool:
        """Whether every device fits its chunks (`chunks` in pipeline order, device i holding chunks i::pp)."""
        cap = self.capacity
        return all(self.stage_memory(cfg, i, chunks[i::cfg.pp], nmb, blk, dt).total <= cap for i in range(cfg.pp))

    def _interleaved_split(self, cfg: ParallelConfig, nmb: int, blk: BlockCost, ends: EndsCost,
                           dt: Dtypes) -> list[int] | None:
        """Blocks per chunk of an interleaved pipeline under memory: blocks per device by `partition_layers`
        with each device's cap and at least one block per chunk, spread over its chunks by `spread_over_chunks`;
        None if no split fits."""
        # the last two devices keep the fewest micro-batches in flight, so no device holds more than they do:
        # when pp of those fall short of the model, no split fits (cheaper than every device's cap)
        roomiest = max(self._max_blocks(cfg, d, nmb, blk, dt) for d in {cfg.pp - 2, cfg.pp - 1})
        if roomiest * cfg.pp < self.model.num_layers:
            return None
        caps = self._device_caps(cfg, nmb, blk, dt)
        totals = partition_layers(self.model.num_layers, blk.total, self._ends_per_device(cfg, ends), caps=caps,
                                  least=cfg.vpp)
        if totals is None:
            return None
        per_device = [spread_over_chunks(n, cfg.vpp) for n in totals]
        return [per_device[j % cfg.pp][j // cfg.pp] for j in range(cfg.pp * cfg.vpp)]

    def _device_caps(self, cfg: ParallelConfig, nmb: int, blk: BlockCost, dt: Dtypes) -> list[int]:
        """The most blocks each pipeline device can hold. The middle devices differ only in the micro-batches
        they keep in flight, which fall with the device index (1F1B and interleaved; GPipe keeps all), so their
        caps rise with it: where two of them agree, every device between agrees too, and only the devices where
        the cap changes need computing (a few dozen for hundreds of stages)."""
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
        if cfg.vpp > 1:
            return self._max_interleaved_blocks(cfg, device, nmb, blk, dt)

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

    def _max_interleaved_blocks(self, cfg: ParallelConfig, device: int, nmb: int, blk: BlockCost,
                                dt: Dtypes) -> int:
        """The most blocks an interleaved device can hold, spread over its chunks by `spread_over_chunks`. Its
        peak rises with every block added but not convexly (the chunk a block joins alternates), so a search
        that gallops out from the equal share L/pp (where the cap usually lies near) and then bisects."""
        cap, top = self.capacity, self.model.num_layers

        def fits(n: int) -> bool:
            chunks = spread_over_chunks(n, cfg.vpp)
            return self.stage_timeline(cfg, device, chunks, nmb, blk, dt).peak.total <= cap

        start = min(top, -(-top // cfg.pp))
        step = 1
        if fits(start):                  # gallop up to the first count that does not fit
            lo = start
            while True:
                if lo == top:
                    return top
                nxt = min(top, lo + step)
                if not fits(nxt):
                    hi = nxt
                    break
                lo, step = nxt, step * 2
        else:                            # gallop down to the first count that fits
            hi = start
            while True:
                if hi == 0:
                    return 0
                nxt = max(0, hi - step)
                if fits(nxt):
                    lo = nxt
                    break
                if nxt == 0:
                    return 0
                hi, step = nxt, step * 2
        while hi - lo > 1:               # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # ------------------------------------------------------------------ lower bounds for the search
    def bounds(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER) -> tuple[float, float]:
        """(step seconds, peak reserved bytes) that no layer split of `cfg` can beat (see time_bound and
        memory_bound)."""
        return self.time_bound(cfg, order), self.memory_bound(cfg)

    def time_bound(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER) -> float:
        """Step seconds no layer split of `cfg` can beat. With total work W per micro-batch over p devices,
        every schedule's closed form is at least its balanced value, (m + p - 1) W/p, or (m + (p-1)/v) W/p
        interleaved, plus the least its transfers add on their hops (pipeline.p2p_on_path); data-parallel
        communication costs at least the overlap slow-down times itself (or all of it when not overlapped); after
        the pipeline, device 0 (which ends its backward last) still reduces and steps at least its fewest blocks
        (`_state_bounds`)."""
        dims = ParallelDims.of(cfg, order)
        layout, tp_group, dp_group = self.layout(dims), self.group(dims, "tp"), self.group(dims, "dp")
        dt = self.dtypes(cfg.zero, cfg.dp)
        ep_grp = self.group(dims, "ep")
        nmb = cfg.microbatches(self.training.global_batch)
        traffic = self.state_traffic(cfg, nmb)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt, cfg.ep, ep_grp, traffic=traffic)
        work = self._work(cfg, blk, tp_group, dt, traffic)
        per_cycle, post = self._state_bounds(cfg, order, dp_group)
        p = cfg.pp
        fill = (p - 1) / cfg.vpp if cfg.schedule == "interleaved" else p - 1
        host = self.engine.host
        hops = self._hops(layout, self._act_msg(cfg)) if p > 1 else 0.0
        transfers = p2p_on_path(cfg.schedule, nmb, p, hops, cfg.vpp, self.engine.overlap.pp_p2p == "exposed")
        return (nmb + fill) * (work / p + per_cycle + host.per_microbatch_s) + transfers + post + host.per_step_s

    def memory_bound(self, cfg: ParallelConfig) -> float:
        """Peak reserved bytes no layer split of `cfg` can beat: the forward phase of the fullest stage holds at
        least L / sum_i 1/a_i, a_i = what one more block adds to every stage's forward peak besides activations
        (`_forward_bytes_per_block`) plus its activations times the micro-batches stage i holds (the continuous
        relaxation of the split), with the sum bounded above by an integral."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule)
        hit = self._memory_bound_cache.get(key)
        if hit is None:
            hit = self._memory_bound_cache[key] = self._memory_bound(cfg)
        return hit

    def _memory_bound(self, cfg: ParallelConfig) -> float:
        """Each device is priced with its own layers (`device_mixes`), so with layers of several kinds each kind
        alone bounds the peak: its blocks must sit somewhere, whatever the others add."""
        dt = self.dtypes(cfg.zero, cfg.dp)
        recipe = self.recipe(cfg.zero, cfg.dp)
        nmb = cfg.microbatches(self.training.global_batch)
        p = cfg.pp
        mixes = [None] if len(self.mix) == 1 else [((kind, n),) for kind, n in self.mix]
        bound = 0.0
        for mix in mixes:
            a = self._block_activations(cfg, dt, mix)
            s = self._forward_bytes_per_block(cfg, recipe, mix)
            L = sum(n for _, n in (mix or self.mix))
            if cfg.schedule == "gpipe" and p > 1:
                inv_sum = p / (s + a * nmb)
            else:   # 1F1B holds min(p - i, m); interleaving holds more, so this bound holds for it too
                k = min(p, nmb)
                inv_sum = math.log1p(a * k / s) / a if a > 0 else k / s
                inv_sum += (p - k) / (s + a * k)
            bound = max(bound, L / inv_sum * self.margin)
        return bound

    def _block_activations(self, cfg: ParallelConfig, dt: Dtypes, mix: Mix | None = None) -> float:
        """One (mean) block's kept bytes per micro-batch, of the model or of the layers `mix` counts (the TP
        group's placement does not change them)."""
        mix = mix or self.mix
        key = (cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, dt, cfg.ep, mix)
        hit = self._acts_cache.get(key)
        if hit is None:      # the mean block's, as `block` weighs the kinds
            hit = self._acts_cache[key] = sum(
                self._kind_activations(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, dt, cfg.ep, moe) * n
                for (moe, win), n in mix) / sum(n for _, n in mix)
        return hit

    def _work(self, cfg: ParallelConfig, blk: BlockCost, tp_group: Group, dt: Dtypes,
              traffic: StateTraffic = NO_TRAFFIC) -> float:
        """Seconds of all forward and backward work of one micro-batch over the whole model (one TP rank);
        `traffic`: what the ends' gathered-buffer copy and wrapper hooks add (StateTraffic)."""
        shared = self.model.tied_embeddings and cfg.pp == 1
        ends_traffic = (traffic.gather_forward, traffic.root_hooks_s, traffic.reduce_copy)
        key = (cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group if self.net.matrix else tp_group.nodes, dt, blk,
               shared, ends_traffic)
        work = self._work_cache.get(key)
        if work is None:
            ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group, dt, shared, traffic)
            work = self._work_cache[key] = (self.model.num_layers * blk.total + ends.emb_fwd.total
                                            + ends.emb_bwd.total + ends.head_fwd.total + ends.head_bwd.total)
        return work

    def _state_bounds(self, cfg: ParallelConfig, order: tuple[str, str, str], dp_group: Group) -> tuple[float, float]:
        """(DP seconds per micro-batch cycle, seconds once per step), at least: the parts of the time bound that
        depend only on the degrees and ZeRO. Per cycle and before the first forward, the average device's (the
        busiest holds at least as much); after the last backward, device 0's with its fewest blocks (vpp, one per
        chunk): it ends its backward last (step.step_times), so the step ends no sooner than its own
        reduction and optimizer step, whichever device holds the most parameters."""
        key = (cfg.tp, cfg.pp, cfg.dp, cfg.ep, cfg.zero, order)
        hit = self._state_bounds_cache.get(key)
        if hit is None:
            kappa = self.dp_overlap_slowdown(cfg.zero)
            mean_comm, mean_opt = self._dp_state_terms(cfg, order, dp_group, self._total_params_per_tp_rank(cfg) /
                                                       cfg.pp, self.expert_params(cfg, self.model.num_layers) / cfg.pp)
            if cfg.pp == 1:
                last_comm, last_opt = mean_comm, mean_opt
            else:
                lightest = min(self.block_params(cfg, ((kind, 1),)) for kind, _ in self.mix)
                least_experts = min(self.expert_params(cfg, 1, ((kind, 1),)) for kind, _ in self.mix)
                last_comm, last_opt = self._dp_state_terms(cfg, order, dp_group,
                                                           cfg.vpp * lightest + self.end_params(cfg, 0),
                                                           cfg.vpp * least_experts)
            # (the host's seconds per parameter tensor are left out: the device that ends the step need not hold
            # the mean device's tensors, e.g. 1F1B's stage 0 without the head's)
            per_cycle = kappa * (mean_comm.fwd_each + mean_comm.bwd_each) + mean_comm.fwd_blocking + \
                mean_comm.bwd_blocking
            once = kappa * (mean_comm.first_fwd + last_comm.last_bwd) + last_comm.after + last_opt
            hit = self._state_bounds_cache[key] = (per_cycle, once)
        return hit

    def _dp_state_terms(self, cfg: ParallelConfig, order: tuple[str, str, str], dp_group: Group, params: float,
                        experts: float) -> tuple[DPComm, float]:
        """(data-parallel communication, optimizer arithmetic seconds) of a device holding `params` parameters
        reduced over the whole DP group and `experts` routed-expert parameters, issued in one call each."""
        recipe = self.recipe(cfg.zero, cfg.dp)
        rails = self.engine.overlap.zero3_rails if cfg.zero >= 3 else 0
        one_call = lambda op, nbytes: self.net.collective(op, nbytes, dp_group, rails)   # noqa: E731
        comm = stage_dp_comm(self.engine, recipe, cfg.zero, cfg.dp, cfg.pp, params, 0, one_call)
        share = cfg.dp if cfg.zero >= recipe.moments_sharded_from else 1
        opt = params / share * self.optimizer_seconds_per_param(cfg.zero, cfg.dp)
        if self.has_experts(cfg):
            edp, edp_group = cfg.dp // cfg.ep, self.group(ParallelDims.of(cfg, order), "edp")
            expert_call = lambda op, nbytes: self.net.collective(op, nbytes, edp_group, rails)   # noqa: E731
            # the engine wraps the experts as the rest: its recipe, over the dp/ep ranks
            comm = add_comm(comm, stage_dp_comm(self.engine, recipe, cfg.zero, edp, cfg.pp, experts, 0, expert_call))
            eshare = edp if cfg.zero >= recipe.moments_sharded_from else 1
            opt += experts / eshare * self.optimizer_seconds_per_param(cfg.zero, cfg.dp)
        return comm, opt

    def _forward_bytes_per_block(self, cfg: ParallelConfig, recipe, mix: Mix | None = None) -> float:
        """Bytes one more block adds to every stage's forward-phase peak besides its activations (states,
        gradients when a backward came first on every stage, gathered or copied weights): the timeline's own
        slope, so the search's memory bound cannot drift from the costing."""
        nmb = cfg.microbatches(self.training.global_batch)
        most_held = max(self._held(cfg, 0, nmb))       # stage 0 holds the most, as the timeline counts them
        key = (cfg.tp, cfg.zero, cfg.dp, cfg.ep, cfg.pp > 1, min(nmb, 2), nmb > most_held, mix)
        hit = self._forward_slope_cache.get(key)
        if hit is not None:
            return hit
        dt = self.dtypes(cfg.zero, cfg.dp)
        fsdp = recipe.gathered_weights_bytes > 0 and cfg.dp > 1 and cfg.zero >= recipe.weights.sharded_from
        copies = 0.0 if fsdp else autocast_weight_bytes(self.model, cfg.tp, dt, cfg.ep, self.layer_params(mix))

        def forward(n: int, block: float, copies: float, regime: Regime) -> float:
            inputs = StageInputs(params=n * block, block_params=block, end_params=0.0, last_params=0.0,
                                 whole_grad_params=0.0, acts_held=0.0, acts_one=0.0, head_acts=0.0,
                                 held=most_held, microbatches=nmb, block_transient=0.0, head_transient=0.0,
                                 head_backward=0.0, autocast_copies=n * copies, pipeline_buffers=0.0,
                                 inflight_outputs=0.0)
            return stage_timeline(recipe, regime, inputs).phases["forward"].total
        dense, regime = self.block_params(cfg, mix), self.regime(cfg, nmb)
        hit = forward(1, dense, copies, regime) - forward(0, dense, copies, regime)
        if self.has_experts(cfg):   # the experts' states at the expert-data-parallel degree, as the timeline adds them
            experts, eregime = self.expert_params(cfg, 1, mix), self._expert_regime(cfg, nmb)
            hit += forward(1, experts, 0.0, eregime) - forward(0, experts, 0.0, eregime)
        self._forward_slope_cache[key] = hit
        return hit

    def placement_signature(self, dims: ParallelDims) -> tuple:
        """What the cost model sees of a rank order: nodes spanned by the TP, DP, EP and expert-DP groups and which
        pipeline boundaries cross nodes in any pipeline (with a measured link matrix, the ranks themselves)."""
        sig = self._signatures.get(dims)
        if sig is None:
            node = self.cluster.gpus_per_node
            # per hop, whether its pipelines stay inside a node, cross nodes, or both
            crossings = tuple(frozenset(g[h] // node != g[h + 1] // node for g in dims.groups_by_residue("pp", node))
                              for h in range(dims.pp - 1))
            moe = ("ep", "edp") if dims.ep > 1 else ()
            sig = dims.order if self.net.matrix is not None else (
                self.group(dims, "tp").nodes, self.group(dims, "dp").nodes, crossings,
                tuple(self.group(dims, d).nodes for d in moe))
            self._signatures[dims] = sig
        return sig

    def _total_params_per_tp_rank(self, cfg: ParallelConfig) -> float:
        return sum(self.end_params(cfg, i) for i in {0, cfg.pp - 1}) + \
            self.model.num_layers * self.block_params(cfg)

    # ------------------------------------------------------------------ evaluation
    def _act_msg(self, cfg: ParallelConfig) -> float:
        """Bytes of the activation one micro-batch sends between stages (sequence-sharded under SP)."""
        dt = self.dtypes(cfg.zero, cfg.dp)
        return cfg.mbs * self.seq * self.model.hidden_size * dt.residual / (cfg.tp if cfg.sp else 1)

    def _hops(self, layout: Layout, nbytes: float) -> tuple[float, ...]:
        """Seconds of one activation transfer on each pipeline hop (stage h to h + 1, pp - 1 of them), each on its
        own link: inside a node or across nodes as the placement puts its two stages (the slowest of the hop's
        rank pairs when links are measured)."""
        key = (layout, nbytes)
        hit = self._hops_cache.get(key)
        if hit is None:
            hit = self._hops_cache[key] = tuple(
                max(self.net.p2p(nbytes, a, b) for a, b in pairs) + self.host_coll for pairs in self._hop_pairs(layout))
        return hit

    def _hop_pairs(self, layout: Layout) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Device pairs of each pipeline hop over every pipeline (the slowest sets the hop's time). Spec-sheet
        links differ only by whether a hop crosses nodes, so there each hop keeps one pair of each kind its
        pipelines use (a pipeline can cross a node boundary where the first one does not)."""
        pairs = self._pairs_cache.get(layout)
        if pairs is None:
            gpn = layout.gpus_per_node
            pipelines = (layout.dims.groups("pp") if self.net.matrix is not None or layout.devices is not None
                         else layout.dims.groups_by_residue("pp", gpn))
            out = []
            for h in range(layout.dims.pp - 1):
                hop = [(layout.device(g[h]), layout.device(g[h + 1])) for g in pipelines]
                if self.net.matrix is None:       # one pair per kind: inside a node, across nodes
                    hop = list({a // gpn == b // gpn: (a, b) for a, b in hop}.values())
                out.append(tuple(hop))
            pairs = self._pairs_cache[layout] = tuple(out)
        return pairs

    def _tied_pair(self, layout: Layout) -> Group:
        """First and last stage devices that all-reduce the tied embedding's gradients (the ends of each
        pipeline group, as the runtime's TiedEmbeddingSync pairs them)."""
        first = layout.dims.group("pp", 0)
        peers = (tuple(layout.on_devices(g) for g in tied_embedding_pairs(layout.dims))
                 if self.net.matrix is not None else ())
        return Group.of(layout.on_devices((first[0], first[-1])), self.cluster.gpus_per_node, peers)

    def dp_comm(self, cfg: ParallelConfig, params: float, layers: int, dp_group: Group,
                dp: int | None = None) -> DPComm:
        """The data-parallel communication of `params` over `dp_group` of `dp` ranks (default cfg.dp)."""
        recipe = self.recipe(cfg.zero, cfg.dp)
        rails = self.engine.overlap.zero3_rails if cfg.zero >= 3 else 0
        return stage_dp_comm(self.engine, recipe, cfg.zero, dp or cfg.dp, cfg.pp, params, layers,
                             lambda op, nbytes: self.net.collective(op, nbytes, dp_group, rails) + self.host_coll,
                             self.dp_calls_per_block if cfg.zero >= 3 else 1)

    def stage_comm(self, cfg: ParallelConfig, params: float, layers: int, dp_group: Group,
                   edp_group: Group | None, mix: Mix | None = None) -> DPComm:
        """One device's data-parallel communication: its `params` over `dp_group` and, with routed experts,
        their gradients over the expert-data-parallel group in the same windows (`mix`: its layers' kinds)."""
        comm = self.dp_comm(cfg, params, layers, dp_group)
        if self.has_experts(cfg):
            comm = add_comm(comm, self.dp_comm(cfg, self.expert_params(cfg, layers, mix), layers, edp_group,
                                               cfg.dp // cfg.ep))
        return comm

    def optimizer_seconds(self, cfg: ParallelConfig, params: float, layers: int, mix: Mix | None = None, *,
                          device: int) -> float:
        """Pipeline device `device`'s optimizer step over its `params` and its `layers` blocks' experts, as
        sharded: their arithmetic, against the host's time to issue it per parameter tensor
        (`optimizer_host_seconds`)."""
        sharded = cfg.zero >= self.recipe(cfg.zero, cfg.dp).moments_sharded_from
        arithmetic = (params / (cfg.dp if sharded else 1)
                      + self.expert_params(cfg, layers, mix) / (cfg.dp // cfg.ep if sharded else 1)
                      ) * self.optimizer_seconds_per_param(cfg.zero, cfg.dp)
        return launched(arithmetic, self.optimizer_host_seconds(cfg, layers, mix, device=device), self.gpu)

    def dtensor_parameters(self, cfg: ParallelConfig) -> bool:
        """Whether the engine's data parallelism holds this configuration's parameters as DTensors: FSDP2 wraps
        the blocks at this ZeRO stage (engine.host.fsdp_hooks)."""
        hooks = self.engine.host.fsdp_hooks
        return cfg.dp > 1 and hooks is not None and \
            hooks.for_stage(cfg.zero, self.engine.overlap.reshard_after_forward) is not None

    def optimizer_tensors(self, cfg: ParallelConfig, layers: float, mix: Mix | None = None, *,
                          device: int) -> tuple[float, float]:
        """(plain, DTensor) parameter tensors of `layers` blocks and of pipeline device `device`'s ends as the
        engine holds them: all DTensors under FSDP2, the sharded ones under DTensor tensor
        parallelism (the norms and learned positions stay plain without sequence parallelism,
        runtime/parallelize.py), all plain otherwise."""
        m, fused = self.model, "projections" in self.opts.fused
        kinds = mix or self.mix
        blocks = sum(tensors_per_block(m, fused, moe) * n for (moe, _), n in kinds) / sum(n for _, n in kinds)
        embedding, head = self.end_tensors(cfg)
        first, last = float(device == 0), float(device == cfg.pp - 1)
        tensors = layers * blocks + embedding * first + head * last
        if self.dtensor_parameters(cfg):
            return 0.0, tensors
        if cfg.tp > 1 and self.engine.host.tp_dtensor is not None:
            plain = (first if position_params(m) else 0.0) + \
                (0.0 if cfg.sp else (2 * layers + last) * norm_tensors(m))
            return plain, tensors - plain
        return tensors, 0.0

    def optimizer_host_seconds(self, cfg: ParallelConfig, layers: float, mix: Mix | None = None, *,
                               device: int) -> float:
        """Host seconds of the optimizer step over `optimizer_tensors`, engine.host.optimizer_per_tensor_s per
        plain tensor and optimizer_per_dtensor_s per DTensor."""
        host = self.engine.host
        if not (host.optimizer_per_tensor_s or host.optimizer_per_dtensor_s):
            return 0.0
        plain, dtensor = self.optimizer_tensors(cfg, layers, mix, device=device)
        return plain * host.optimizer_per_tensor_s + dtensor * host.optimizer_per_dtensor_s

    def evaluate_core(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                      devices: tuple[int, ...] | None = None) -> Core:
        """Step time, its breakdown and memory per stage of a valid `cfg` (see `evaluate`); `devices` places
        rank r on device devices[r]."""
        m, tr, host = self.model, self.training, self.engine.host
        nmb = cfg.microbatches(tr.global_batch)
        dt = self.dtypes(cfg.zero, cfg.dp)
        dims = ParallelDims.of(cfg, order)
        layout = self.layout(dims, devices)
        tp_group, dp_group = self.group(dims, "tp", devices), self.group(dims, "dp", devices)
        ep_grp, edp_group = self.group(dims, "ep", devices), self.group(dims, "edp", devices)
        traffic = self.state_traffic(cfg, nmb)
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt, cfg.ep, ep_grp, traffic=traffic)
        ends = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group, dt, m.tied_embeddings and cfg.pp == 1, traffic)
        pp, last = cfg.pp, cfg.pp - 1
        tied = 0.0
        if m.tied_embeddings and pp > 1:
            tied = self.net.collective("all_reduce", self.vocab(cfg.tp) * m.hidden_size / cfg.tp
                                       * self.recipe(cfg.zero, cfg.dp).reduce_bytes, self._tied_pair(layout))
        made: dict[tuple[bool, bool, int], DeviceWork] = {}

        def work_of(i: int, n: int) -> DeviceWork:
            """Device i holding n blocks (devices other than the first and the last are alike)."""
            key = (i == 0, i == last, n)
            w = made.get(key)
            if w is None:
                params = self.device_params(cfg, i, n)
                w = made[key] = DeviceWork(n, blk, ends, self.stage_comm(cfg, params, n, dp_group, edp_group),
                                           tied if i in (0, last) else 0.0, self.optimizer_seconds(cfg, params, n,
                                                                                                    device=i))
            return w

        def work_at(i: int, first: int, n: int) -> DeviceWork:
            """Device i holding the n blocks from block `first` on (a model whose blocks differ)."""
            mix = self.range_mix(first, n)
            key = (i == 0, i == last, mix)
            w = made_at.get(key)
            if w is None:
                own = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt, cfg.ep, ep_grp, mix, traffic)
                w = made_at[key] = self._own_work(cfg, i, n, own, ends, mix, dp_group, edp_group,
                                                  tied if i in (0, last) else 0.0)
            return w
        made_at: dict[tuple, DeviceWork] = {}

        blocking = self.engine.overlap.pp_p2p == "exposed"
        hops = self._hops(layout, self._act_msg(cfg)) if pp > 1 else ()
        chunks = (list(cfg.layers_per_stage) if cfg.layers_per_stage
                  else self.default_layers(cfg, blk, ends, dt, work_of, hops, blocking,
                                           work_at if len(self.mix) > 1 else None))
        device_chunks = [chunks[i::pp] for i in range(pp)]
        layers = [sum(c) for c in device_chunks]
        # the step and memory are those of each device's own layers (an interleaved split is chosen with mean
        # blocks; 1F1B and GPipe splits with the devices' own)
        mixes = self.device_mixes(chunks, pp) or [None] * pp
        blocks = [self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group, dt, cfg.ep, ep_grp, mix, traffic)
                  if mix else blk for mix in mixes]
        work = [work_of(i, n) if mix is None else self._own_work(cfg, i, n, blocks[i], ends, mix, dp_group, edp_group,
                                                                 tied if i in (0, last) else 0.0)
                for i, (n, mix) in enumerate(zip(layers, mixes))]
        st = step_times(cfg.schedule, cfg.vpp, nmb, work, hops or 0.0, self.dp_overlap_slowdown(cfg.zero),
                        host.per_microbatch_s, host.per_step_s, blocking, self.engine.overlap.gather_window)

        # --- memory
        stages = [self.stage_memory(cfg, i, device_chunks[i], nmb, blocks[i], dt, mixes[i]) for i in range(pp)]
        totals = [s.total for s in stages]
        fullest = max(range(pp), key=totals.__getitem__)
        peak_total = totals[fullest]
        peak_reserved = peak_total * self.margin
        return Core(cfg=cfg, order=order, chunks=chunks, nmb=nmb, step=st.step, crit=st.crit, time=st.time,
                    stages=stages, peak_total=peak_total, peak_reserved=peak_reserved, fullest=fullest,
                    feasible=peak_reserved <= self.budget_bytes, devices=devices,
                    work=StageWork(device_chunks, blocks, ends, st.zero_fwd, st.zero_bwd, hops, st.post_comm,
                                   st.post_opt, st.pipeline, pre_comm=st.pre_comm, host_step=host.per_step_s,
                                   blocking_p2p=blocking, host_microbatch=host.per_microbatch_s))

    def _own_work(self, cfg: ParallelConfig, device: int, layers: int, blk: BlockCost, ends: EndsCost, mix: Mix,
                  dp_group: Group, edp_group: Group | None, tied: float) -> DeviceWork:
        """Device `device` holding `layers` blocks of the kinds `mix` counts, `blk` their mean block."""
        params = self.device_params(cfg, device, layers, mix)
        return DeviceWork(layers, blk, ends, self.stage_comm(cfg, params, layers, dp_group, edp_group, mix), tied,
                          self.optimizer_seconds(cfg, params, layers, mix, device=device))

    def dp_overlap_slowdown(self, zero: int) -> float:
        """Share of overlapped data-parallel communication time still lost to compute: the cluster's, or all of it
        (1) where the engine overlaps at this ZeRO stage only through a side stream the device does not have."""
        if not self.gpu.async_launch and zero in self.engine.overlap.dp_on_side_stream:
            return 1.0
        return self.cluster.overlap_slowdown

    def launch_ratio(self, cfg: ParallelConfig) -> float:
        """Host seconds to issue the kernels of the model's blocks (forward, backward, recomputation; one
        micro-batch) over the GPU's seconds to run them: above 1 the blocks are host-launch-bound (0 on a
        synchronous device, and with a profile's measured blocks, whose times hold both)."""
        if not self.gpu.async_launch or self.measured is not None:
            return 0.0
        dt, device, host = self.dtypes(cfg.zero, cfg.dp), 0.0, 0.0
        for (moe, windowed), n in self.mix:
            w = self._block_work(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, dt, cfg.ep, moe, windowed)[0]
            for p, per_kernel in ((w.forward, self.host_fwd), (w.backward, self.host_bwd),
                                  (w.recompute, self.host_fwd)):
                device += n * device_time(p, self.gpu, dt.matmul, self.opts.gemm_scale)
                host += n * len(p.kernels) * per_kernel
        return host / device if device > 0 else 0.0

    def sources_for(self, cfg: ParallelConfig) -> dict[str, str]:
        """`sources` with where this configuration's block numbers came from."""
        out = dict(self.sources)
        if self.measured is not None:
            kinds = sorted({moe for (moe, _), _ in self.mix})
            where = []
            for moe in kinds:
                factors = self.measured.block(cfg.tp, cfg.mbs, cfg.recompute, moe)
                said = factors.measured_at if factors is not None else "computed (not in the profile)"
                where.append(f"{'MoE' if moe else 'dense'} blocks {said}" if len(kinds) > 1 else said)
            out["layer times and activation bytes"] += ": " + "; ".join(where)
        return out

    def evaluate(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                 validate: bool = True) -> Prediction:
        """Predict step time, throughput and memory of `cfg` (validated against the specs first)."""
        if validate:
            check_config(self.model, self.cluster, self.training, cfg, self.engine)
        return self.prediction(self.evaluate_core(cfg, order))

    def model_summary(self) -> ModelSummary:
        from planner.cost.params import active_params
        moe = self.model.moe
        return ModelSummary(name=self.model.name, params=total_params(self.model),
                            active_params=active_params(self.model),
                            num_experts=moe.num_experts if moe else None, top_k=moe.top_k if moe else None,
                            moe_layers=self.model.num_moe_layers if moe else None,
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
            binding=_binding(time, step, fullest, budget, core.feasible, self.launch_ratio(cfg)),
            memory=MemoryBreakdown(capacity_bytes=gpu.memory_bytes, usable_bytes=round(usable),
                                   headroom=self.memory_headroom, budget_bytes=round(budget), stages=stages),
            time=time, sources=self.sources_for(cfg))
        fields = {k: getattr(cfg, k) for k in ParallelConfig.model_fields if k != "layers_per_stage"}
        resolved = ResolvedConfig(**fields, layers_per_stage=core.chunks, num_microbatches=core.nmb,
                                  layout=list(core.order),
                                  placement=list(core.devices) if core.devices is not None else None)
        return Prediction(feasible=core.feasible, reason=reason, engine=self.engine.label(),
                          model=self.model_summary(), config=resolved, predicted=predicted)


def _binding(time: TimeBreakdown, step: float, fullest: StageMemory, budget: float, feasible: bool,
             launch_ratio: float = 0.0) -> str:
    """One line: the largest shares of the step and how full the fullest GPU is. `launch_ratio`
    (CostModel.launch_ratio) above 1 names blocks whose kernels the host issues slower than the GPU runs them."""
    shares = sorted(time.model_dump().items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / step:.0%}" for k, v in shares[:3] if v > 0)
    mem = (f"stage {fullest.stage} memory {fullest.reserved / GIB:.1f} of a {budget / GIB:.1f} GiB budget "
           f"({fullest.peak_phase})")
    if not feasible:
        return f"memory: {mem}"
    kind = {"compute": "compute-bound", "recompute": "recompute-heavy", "bubble": "pipeline-bubble-bound",
            "tp_comm": "TP-communication-bound", "pp_comm": "PP-communication-bound",
            "dp_comm_exposed": "DP-communication-bound", "optimizer": "optimizer-bound",
            "ep_comm": "EP-all-to-all-bound",
            "host": "host-bound"}[shares[0][0]]
    if shares[0][0] in ("compute", "recompute") and launch_ratio > 1.0:
        kind = f"host-launch-bound (issuing the blocks' kernels takes the host {launch_ratio:.1f}x the GPU's time)"
    return f"{kind} ({top}); {mem}" + (" (tight)" if fullest.reserved > 0.95 * budget else "")
