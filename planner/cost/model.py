"""The cost model: (model, cluster, training, parallel config) -> Prediction.

Pure functions of the specs, with caches for the per-block work that many configurations share (the
search evaluates thousands of configurations through one CostModel). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.comm import Group, Network
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.kernels import Dtypes, Pass, block_work, embedding_work, head_work, pass_time
from planner.cost.memory import (DDP_BUCKET_BYTES, GIB, block_activation_bytes, block_backward_transient_bytes,
                                 embedding_activation_bytes, head_activation_bytes, head_transient_bytes,
                                 in_flight_microbatches, interleaved_in_flight_chunks, model_state_bytes,
                                 state_bytes)
from planner.cost.params import embedding_params, final_norm_params, layer_params, position_params
from planner.cost.pipeline import pipeline_time
from planner.layout import DEFAULT_ORDER, Layout
from planner.partition import partition_layers
from planner.prediction import (MemoryBreakdown, Predicted, Prediction, ResolvedConfig, StageMemory,
                                TimeBreakdown)
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec
from planner.validate import check_config


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


@dataclass(frozen=True)
class BlockCost:
    forward: PassCost
    backward: PassCost
    recompute: PassCost
    activation_bytes: float
    transient_bytes: float


@dataclass
class DeviceTimes:
    """Per-micro-batch seconds on one pipeline device, split as the breakdown reports them."""

    compute: float = 0.0
    recompute: float = 0.0
    tp_comm: float = 0.0
    forward: float = 0.0      # all forward work (compute + comm)
    backward: float = 0.0     # all backward work including recomputation
    zero_exposed: float = 0.0  # ZeRO-2/3 per-micro-batch communication left exposed


class CostModel:
    """Costs of parallel configurations for one (model, cluster, training)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec):
        self.model, self.cluster, self.training = model, cluster, training
        self.gpu = cluster.gpu
        self.dt = Dtypes.of(training.precision)
        self.states = state_bytes(training.precision, training.optimizer)
        self.net = Network(cluster)
        self.layer = layer_params(model)
        self.seq = training.seq_len
        self._blocks: dict[tuple, BlockCost] = {}
        self._ends: dict[tuple, tuple[PassCost, PassCost, PassCost, PassCost]] = {}

    # ------------------------------------------------------------------ per-block and end pieces
    def _pass_cost(self, p: Pass, tp_group: Group) -> PassCost:
        comm = sum(self.net.collective(c.op, c.bytes, tp_group) for c in p.collectives)
        return PassCost(pass_time(p, self.gpu, self.dt.matmul), comm)

    def block(self, tp: int, mbs: int, sp: bool, recompute: str, tp_group: Group) -> BlockCost:
        key = (tp, mbs, sp, recompute, tp_group.nodes)
        cost = self._blocks.get(key)
        if cost is None:
            w = block_work(self.model, mbs, self.seq, tp, sp, recompute, self.dt)
            cost = BlockCost(
                self._pass_cost(w.forward, tp_group), self._pass_cost(w.backward, tp_group),
                self._pass_cost(w.recompute, tp_group),
                block_activation_bytes(self.model, mbs, self.seq, tp, sp, recompute, self.dt),
                block_backward_transient_bytes(self.model, mbs, self.seq, tp, sp, recompute, self.dt))
            self._blocks[key] = cost
        return cost

    def ends(self, tp: int, mbs: int, sp: bool, tp_group: Group) -> tuple[PassCost, PassCost, PassCost, PassCost]:
        """(embedding fwd, embedding bwd, head fwd, head bwd)."""
        key = (tp, mbs, sp, tp_group.nodes)
        cost = self._ends.get(key)
        if cost is None:
            ef, eb = embedding_work(self.model, mbs, self.seq, tp, sp, self.dt)
            hf, hb = head_work(self.model, mbs, self.seq, tp, sp, self.dt)
            cost = tuple(self._pass_cost(p, tp_group) for p in (ef, eb, hf, hb))
            self._ends[key] = cost
        return cost

    # ------------------------------------------------------------------ parameters per device
    def device_params(self, cfg: ParallelConfig, device: int, layers: int) -> float:
        """Parameters one TP rank of pipeline device `device` holds (elements)."""
        m, tp, last = self.model, cfg.tp, cfg.pp - 1
        params = layers * self.layer.per_tp_rank(tp)
        if device == 0:
            params += embedding_params(m) / tp + position_params(m)
        if device == last:
            params += final_norm_params(m)
            if not m.tied_embeddings or cfg.pp > 1:      # untied head, or the tied copy on the last stage
                params += embedding_params(m) / tp
        return params

    # ------------------------------------------------------------------ default layer split
    def default_layers(self, cfg: ParallelConfig, tp_group: Group) -> list[int]:
        """Balanced blocks per chunk, the embedding and head counted; equal chunks when interleaved."""
        m, chunks = self.model, cfg.pp * cfg.vpp
        if cfg.vpp > 1 or cfg.pp == 1:
            base, rest = divmod(m.num_layers, chunks)
            return [base + (1 if j >= chunks - rest else 0) for j in range(chunks)]
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group)
        ef, eb, hf, hb = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group)
        per_block = sum(x.compute + x.comm for x in (blk.forward, blk.backward, blk.recompute))
        extra = [0.0] * cfg.pp
        extra[0] += ef.compute + ef.comm + eb.compute + eb.comm
        extra[-1] += hf.compute + hf.comm + hb.compute + hb.comm
        nmb = cfg.microbatches(self.training.global_batch)
        per_layer_bytes, base_bytes = [], []
        for i in range(cfg.pp):
            fixed = self._device_memory(cfg, i, 0, nmb, blk, tp_group)
            one = self._device_memory(cfg, i, 1, nmb, blk, tp_group)
            per_layer_bytes.append(one - fixed)
            base_bytes.append(fixed)
        capacity = self.usable_bytes / (1 + self.gpu.allocator_margin)
        split = partition_layers(m.num_layers, per_block, extra, per_layer_bytes, base_bytes, capacity)
        return split or partition_layers(m.num_layers, per_block, extra)

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes - self.gpu.runtime_reserved_bytes

    # ------------------------------------------------------------------ memory
    def _device_memory(self, cfg: ParallelConfig, device: int, layers: int, nmb: int, blk: BlockCost,
                       tp_group: Group) -> float:
        """Total bytes of a device holding `layers` blocks in one chunk (used by the layer split)."""
        return sum(self._memory_parts(cfg, device, [layers], nmb, blk))

    def _memory_parts(self, cfg: ParallelConfig, device: int, chunk_layers: list[int], nmb: int,
                      blk: BlockCost) -> tuple[float, float, float, float, float]:
        """(params, grads, optimizer, activations, other) bytes on one GPU of a pipeline device, whose
        chunks (in local order) hold `chunk_layers` blocks."""
        m, tp, sp, mbs, dt = self.model, cfg.tp, cfg.sp, cfg.mbs, self.dt
        layers = sum(chunk_layers)
        states = model_state_bytes(self.device_params(cfg, device, layers), self.states, cfg.zero, cfg.dp)
        first, last = device == 0, device == cfg.pp - 1
        if cfg.schedule == "interleaved":
            held = interleaved_in_flight_chunks(cfg.pp, cfg.vpp, device, nmb)
        else:
            held = [in_flight_microbatches(cfg.schedule, cfg.pp, device, nmb)]
        acts = sum(n * blk.activation_bytes * h for n, h in zip(chunk_layers, held))
        if first:
            acts += embedding_activation_bytes(m, mbs, self.seq, tp, sp) * held[0]
        if last:
            acts += head_activation_bytes(m, mbs, self.seq, tp, sp, dt) * (held[-1] if cfg.pp > 1 else held[0])
        transient = blk.transient_bytes if layers else 0.0
        if last:
            transient = max(transient, head_transient_bytes(m, mbs, self.seq, tp, dt))
        other = transient
        if cfg.zero == 3 and cfg.dp > 1:
            # FSDP keeps the block it computes and the prefetched next one unsharded, plus one block's
            # unsharded gradients before their reduce-scatter
            block_params = self.layer.per_tp_rank(tp)
            other += block_params * (2 * self.states.weights + self.states.grads)
        elif cfg.dp > 1:
            other += 2 * DDP_BUCKET_BYTES
        return states.params, states.grads, states.optimizer, acts, other

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cfg: ParallelConfig, order: tuple[str, str, str] = DEFAULT_ORDER,
                 validate: bool = True) -> Prediction:
        """Predict step time, throughput and memory of `cfg`."""
        m, tr, gpu = self.model, self.training, self.gpu
        if validate:
            check_config(m, self.cluster, tr, cfg)
        nmb = cfg.microbatches(tr.global_batch)
        layout = Layout(cfg.tp, cfg.pp, cfg.dp, self.cluster.gpus_per_node, order)
        tp_group, dp_group = layout.group("tp"), layout.group("dp")
        blk = self.block(cfg.tp, cfg.mbs, cfg.sp, cfg.recompute, tp_group)
        ef, eb, hf, hb = self.ends(cfg.tp, cfg.mbs, cfg.sp, tp_group)
        chunks = list(cfg.layers_per_stage) if cfg.layers_per_stage else self.default_layers(cfg, tp_group)
        device_chunks = [chunks[i::cfg.pp] for i in range(cfg.pp)]

        # --- per-device, per-micro-batch times
        devices = []
        for i, local in enumerate(device_chunks):
            n = sum(local)
            d = DeviceTimes()
            parts_f = [(blk.forward, n)]
            parts_b = [(blk.backward, n)]
            if i == 0:
                parts_f.append((ef, 1))
                parts_b.append((eb, 1))
            if i == cfg.pp - 1:
                parts_f.append((hf, 1))
                parts_b.append((hb, 1))
            for pc, k in parts_f + parts_b:
                d.compute += k * pc.compute
                d.tp_comm += k * pc.comm
            d.recompute = n * blk.recompute.compute
            d.tp_comm += n * blk.recompute.comm
            d.forward = sum(k * (pc.compute + pc.comm) for pc, k in parts_f)
            d.backward = (sum(k * (pc.compute + pc.comm) for pc, k in parts_b)
                          + n * (blk.recompute.compute + blk.recompute.comm))
            devices.append(d)

        # --- ZeRO-2/3 communication every micro-batch, overlapped with that micro-batch's compute
        device_params = [self.device_params(cfg, i, sum(c)) for i, c in enumerate(device_chunks)]
        kappa = self.cluster.overlap_slowdown
        if cfg.zero >= 2 and cfg.dp > 1:
            for i, d in enumerate(devices):
                grads_rs = self.net.collective("reduce_scatter", device_params[i] * self.states.grads, dp_group)
                fwd_ag = bwd_ag = 0.0
                if cfg.zero == 3:
                    nblocks = max(1, sum(device_chunks[i]))
                    gather = nblocks * self.net.collective(
                        "all_gather", device_params[i] / nblocks * self.states.weights, dp_group)
                    fwd_ag = bwd_ag = gather
                fwd_exposed = _exposed(fwd_ag, d.forward, kappa)
                bwd_exposed = _exposed(bwd_ag + grads_rs, d.backward, kappa)
                d.zero_exposed = fwd_exposed + bwd_exposed
                d.forward += fwd_exposed
                d.backward += bwd_exposed

        # --- pipeline
        act_msg = cfg.mbs * self.seq * m.hidden_size * self.dt.act / (cfg.tp if cfg.sp else 1)
        p2p = max((self.net.p2p(act_msg, layout.rank(i, 0, 0), layout.rank(i + 1, 0, 0))
                   for i in range(cfg.pp - 1)), default=0.0)
        pipe, crit = pipeline_time(cfg.schedule, nmb, [d.forward for d in devices],
                                   [d.backward for d in devices], p2p, cfg.vpp)

        # --- after the last backward: DP gradient reduction, tied-embedding sync, optimizer
        post, post_parts = [], []
        opt_bytes = optimizer_bytes_per_param(tr.precision, tr.optimizer)
        for i, d in enumerate(devices):
            params = device_params[i]
            comm = 0.0
            if cfg.dp > 1:
                grads, weights = params * self.states.grads, params * self.states.weights
                if cfg.zero == 0:
                    comm = _exposed(self.net.collective("all_reduce", grads, dp_group), d.backward, kappa)
                elif cfg.zero == 1:
                    comm = (_exposed(self.net.collective("reduce_scatter", grads, dp_group), d.backward, kappa)
                            + self.net.collective("all_gather", weights, dp_group))
                elif cfg.zero == 2:
                    comm = self.net.collective("all_gather", weights, dp_group)
            if m.tied_embeddings and cfg.pp > 1 and i in (0, cfg.pp - 1):
                first, last = layout.rank(0, 0, 0), layout.rank(cfg.pp - 1, 0, 0)
                comm += self.net.collective("all_reduce", embedding_params(m) / cfg.tp * self.states.grads,
                                            Group.of((first, last), self.cluster.gpus_per_node))
            local = params / (cfg.dp if cfg.zero >= 1 else 1)
            opt = local * opt_bytes / (gpu.hbm_bandwidth * gpu.efficiency.memory)
            post.append(comm + opt)
            post_parts.append((comm, opt))
        last_dev = max(range(cfg.pp), key=post.__getitem__)
        step = pipe + post[last_dev]

        # --- time breakdown on the critical path (sums to step)
        c = devices[crit]
        transfers = (2 * cfg.vpp if cfg.schedule == "interleaved" else 2) * p2p if cfg.pp > 1 else 0.0
        time = TimeBreakdown(
            compute=nmb * c.compute, recompute=nmb * c.recompute, tp_comm=nmb * c.tp_comm,
            pp_comm=nmb * transfers, dp_comm_exposed=nmb * c.zero_exposed + post_parts[last_dev][0],
            optimizer=post_parts[last_dev][1], bubble=0.0)
        time.bubble = max(0.0, step - sum(time.model_dump().values()))

        # --- memory
        stages = []
        for i, local in enumerate(device_chunks):
            parts = self._memory_parts(cfg, i, local, nmb, blk)
            total = sum(parts)
            stages.append(StageMemory(stage=i, layers=sum(local), params=round(parts[0]), grads=round(parts[1]),
                                      optimizer=round(parts[2]), activations=round(parts[3]),
                                      other=round(parts[4]), total=round(total),
                                      reserved=round(total * (1 + gpu.allocator_margin))))
        fullest = max(stages, key=lambda s: s.reserved)
        usable = self.usable_bytes
        feasible = fullest.reserved <= usable
        reason = "" if feasible else (
            f"out of memory: stage {fullest.stage} needs {fullest.reserved / GIB:.1f} GiB, "
            f"{(fullest.reserved - usable) / GIB:.1f} GiB more than the {usable / GIB:.1f} GiB usable")

        # --- throughput
        model_flops = model_flops_per_step(m, tr.global_batch, self.seq)
        hw_flops = hardware_flops_per_step(m, tr.global_batch, self.seq, cfg.recompute == "full")
        gpus = cfg.num_gpus
        peak = gpu.peak(self.dt.matmul)
        predicted = Predicted(
            step_time_s=step, tokens_per_s=tr.tokens_per_step / step,
            mfu=model_flops / (step * gpus * peak), tflops_per_gpu=model_flops / (step * gpus) / 1e12,
            hardware_tflops_per_gpu=hw_flops / (step * gpus) / 1e12,
            peak_memory_bytes=fullest.total, peak_reserved_bytes=fullest.reserved, critical_stage=crit,
            binding=_binding(time, step, fullest, usable, feasible),
            memory=MemoryBreakdown(capacity_bytes=gpu.memory_bytes, usable_bytes=round(usable), stages=stages),
            time=time)
        resolved = ResolvedConfig(**cfg.model_dump(exclude={"layers_per_stage"}), layers_per_stage=chunks,
                                  num_microbatches=nmb, layout=list(order))
        return Prediction(feasible=feasible, reason=reason, config=resolved, predicted=predicted)


def _binding(time: TimeBreakdown, step: float, fullest: StageMemory, usable: float, feasible: bool) -> str:
    """One line: the largest share of the step and how full the fullest GPU is."""
    shares = sorted(time.model_dump().items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / step:.0%}" for k, v in shares[:3] if v > 0)
    mem = f"stage {fullest.stage} memory {fullest.reserved / GIB:.1f} of {usable / GIB:.1f} GiB"
    if not feasible:
        return f"memory: {mem}"
    kind = {"compute": "compute-bound", "recompute": "recompute-heavy", "bubble": "pipeline-bubble-bound",
            "tp_comm": "TP-communication-bound", "pp_comm": "PP-communication-bound",
            "dp_comm_exposed": "DP-communication-bound", "optimizer": "optimizer-bound"}[shares[0][0]]
    return f"{kind} ({top}); {mem}" + (" (tight)" if fullest.reserved > 0.9 * usable else "")


def estimate(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, cfg: ParallelConfig) -> Prediction:
    """Predict one configuration (validates it first)."""
    return CostModel(model, cluster, training).evaluate(cfg)

