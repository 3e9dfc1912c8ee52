"""A heterogeneous plan as the plan file's objects (Prediction, rank layout) and in words."""

from __future__ import annotations

from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.memory import GIB
from planner.cost.model import _binding
from planner.hetero.cost import HeteroCore, HeteroCost
from planner.hetero.search import HeteroResult, label
from planner.parallel_dims import ParallelDims
from planner.prediction import MemoryBreakdown, Predicted, Prediction, ResolvedConfig, StageMemory, TimeBreakdown
from planner.specs import ParallelConfig


def prediction(hc: HeteroCost, core: HeteroCore) -> Prediction:
    """The Prediction of a placed configuration: MFU against the peaks of the GPUs it runs on, memory against
    each stage's own GPU (the breakdown's capacity and budget are the fullest stage's GPU's)."""
    cand, tr, m = core.cand, hc.training, hc.model
    costs = [hc.costs[k] for k in core.groups]
    dt = costs[0].dtypes(cand.zero, cand.dp)
    stages = [StageMemory(stage=s, layers=st.layers, params=round(st.params), grads=round(st.grads),
                          optimizer=round(st.optimizer), activations=round(st.activations), other=round(st.other),
                          total=round(st.total), reserved=round(core.reserved[s]), peak_phase=st.phase,
                          phases={k: round(v) for k, v in st.phase_totals.items()})
              for s, st in enumerate(core.stages)]
    f = core.fullest
    full = costs[f]
    budget = full.budget_bytes
    reason = "" if core.feasible else (
        f"out of memory: stage {f} ({hc.groups[core.groups[f]].name}) needs {core.reserved[f] / GIB:.1f} GiB, "
        f"{(core.reserved[f] - budget) / GIB:.1f} GiB more than its {budget / GIB:.1f} GiB budget")
    time = TimeBreakdown(**core.time)
    gpus = cand.tp * cand.pp * cand.dp
    per_stage = cand.tp * cand.dp
    peak_sum = sum(c.gpu.peak(dt.matmul) * per_stage for c in costs)
    flops = model_flops_per_step(m, tr.global_batch, tr.seq_len)
    hw = hardware_flops_per_step(m, tr.global_batch, tr.seq_len, cand.recompute == "full",
                                 padded_vocab=hc.costs[0].vocab(cand.tp))
    predicted = Predicted(
        step_time_s=core.step, tokens_per_s=tr.tokens_per_step / core.step, mfu=flops / (core.step * peak_sum),
        tflops_per_gpu=flops / (core.step * gpus) / 1e12, hardware_tflops_per_gpu=hw / (core.step * gpus) / 1e12,
        peak_memory_bytes=stages[f].total, peak_reserved_bytes=stages[f].reserved, critical_stage=core.crit,
        binding=_binding(time, core.step, stages[f], budget, core.feasible),
        memory=MemoryBreakdown(capacity_bytes=full.gpu.memory_bytes, usable_bytes=round(full.usable_bytes),
                               headroom=full.memory_headroom, budget_bytes=round(budget), stages=stages),
        time=time, sources={**hc.costs[0].sources, "node groups": f"stages placed by {core.method}",
                            "communication": "alpha-beta per node group; group links "
                                             + ("measured" if hc.cluster.link_matrix is not None else "from the spec")})
    fields = {k: getattr(cand, k) for k in ParallelConfig.model_fields if k not in ("layers_per_stage",)}
    resolved = ResolvedConfig(**fields, layers_per_stage=list(core.layers), num_microbatches=core.nmb,
                              layout=["tp", "dp", "pp"], placement=list(core.devices))
    return Prediction(feasible=core.feasible, reason=reason, engine=hc.engine.label(),
                      model=hc.costs[0].model_summary(), config=resolved, predicted=predicted)


def rank_rows(hc: HeteroCost, core: HeteroCore) -> list[dict]:
    """Every rank with its coordinate, node, local GPU, node group and GPU type."""
    dims = ParallelDims.of(core.cand)          # node groups number ranks in Megatron-LM's order
    rows = []
    for rank, device in enumerate(core.devices):
        g = hc.groups[hc.links.group_of(device)]
        local = device - g.first_device
        rows.append({"rank": rank, **dims.coords(rank), "node": g.first_node + local // g.gpus_per_node,
                     "local_gpu": local % g.gpus_per_node, "node_group": g.name, "gpu_type": g.gpu_type})
    return rows


def stage_runs(hc: HeteroCost, core: HeteroCore) -> str:
    """'stages 0-3 on h100 (10 layers each), 4-5 on a100 (20)': consecutive stages on one group together."""
    runs, start = [], 0
    for s in range(1, len(core.groups) + 1):
        if s == len(core.groups) or core.groups[s] != core.groups[start]:
            layers = core.layers[start:s]
            span = f"{start}" if s - start == 1 else f"{start}-{s - 1}"
            each = f"{layers[0]} layers" + (" each" if len(layers) > 1 else "") if len(set(layers)) == 1 else \
                f"{'+'.join(map(str, layers))} layers"
            runs.append(f"{span} on {hc.groups[core.groups[start]].name} ({each})")
            start = s
    return "stages " + ", ".join(runs)


def explain(hc: HeteroCost, result: HeteroResult) -> list[str]:
    """What the winning plan does with the node groups, and what it gains, in sentences."""
    best = result.top[0]
    cand = best.cand
    if len(best.used) == 1:
        lines = [f"{stage_runs(hc, best)}: the plan runs on {hc.groups[best.used[0]].name} alone, every stage tp "
                 f"{cand.tp} x dp {cand.dp} GPUs."]
    else:
        lines = [f"{stage_runs(hc, best)}; every stage is tp {cand.tp} x dp {cand.dp} GPUs of one node group, so "
                 f"TP stays inside a node and data parallelism inside a group: "
                 + (f"the {cand.dp} replicas of the pipeline each span the groups in the same order, with equal "
                    f"micro-batches (each replica's stage s runs on the same GPU type, so the replicas are equally "
                    f"fast; uneven micro-batches per replica are not planned: the engines split the batch evenly "
                    f"over data-parallel ranks, and replicas on different GPU types would put the gradient "
                    f"all-reduce on the link between groups)." if cand.dp > 1 else
                    "one pipeline spans the groups (no data parallelism).")]
    crossings = [s for s in range(cand.pp - 1) if best.groups[s] != best.groups[s + 1]]
    if crossings:
        slow = [(hc.hop_seconds(cand, best.devices, s), s) for s in crossings]
        worst, at = max(slow)
        a, b = hc.groups[best.groups[at]].name, hc.groups[best.groups[at + 1]].name
        link = hc.links.link(best.groups[at], best.groups[at + 1])
        lines.append(f"only pipeline transfers cross groups ({len(crossings)} of {cand.pp - 1} stage boundaries; "
                     f"the slowest, {a} -> {b} at {link.bandwidth / 1e9:.1f} GB/s per node, "
                     f"{worst * 1e3:.2f} ms per micro-batch activation); gradients and TP traffic never do.")
    if len({hc.groups[k].gpu_type for k in best.groups}) > 1:
        held = []
        for g in hc.groups:
            layers = [n for k, n in zip(best.groups, best.layers) if k == g.index]
            if layers:
                held.append(f"{g.name} stages hold {min(layers)}-{max(layers)} layers "
                            f"({hc.block_seconds(cand, g.index) * 1e3:.1f} ms per block and micro-batch)")
        lines.append("layers follow each GPU type's speed and each position's memory: " + ", ".join(held) + ".")
    lines.append(f"stages assigned by {best.method}.")
    idle = [g.name for g in hc.groups if g.index not in best.used]
    if idle:
        every = result.every_group
        cost = (f"the best plan on every group ({label(every.cand)}) takes {every.step:.3g} s against "
                f"{best.step:.3g} s, {every.step / best.step - 1:+.1%}" if every is not None
                else "no plan on every group fits in memory")
        lines.insert(0, f"the {' and '.join(idle)} group{'s are' if len(idle) > 1 else ' is'} left idle: using "
                        f"{'them' if len(idle) > 1 else 'it'} costs more than it adds ({cost}).")
    faster = [p for p in result.parts if p.step is not None and p.step < best.step]
    if faster:
        alone = min(faster, key=lambda p: p.step)
        lines.insert(0, f"warning: {alone.group} alone ({alone.config}) is faster, {alone.step:.3g} s against "
                        f"{best.step:.3g} s, as the homogeneous search plans it (with degrees the pins exclude here, "
                        f"interleaved schedules and rank orders the node-group search leaves out, or a layer split "
                        f"by the whole step, not the stage objective); plan that "
                        f"group by itself.")
    if result.naive is not None:
        n = result.naive
        fit = "" if n.feasible else "; the naive order does not even fit in memory"
        lines.append(f"gain over naive rank order (the same degrees, stages on the groups as listed, layers split "
                     f"evenly): {n.step / best.step - 1:+.1%} ({n.step:.3g} s -> {best.step:.3g} s{fit}).")
    for part in result.parts:
        if part.step is None:
            lines.append(f"on {part.group} ({part.gpus} GPUs) nothing fits.")
        else:
            alone = part.group if " " in part.group else f"{part.group} alone"
            lines.append(f"gain over the best plan on {alone} ({part.gpus} GPUs, {part.config}): "
                         f"{part.step / best.step - 1:+.1%} throughput ({part.step:.3g} s -> {best.step:.3g} s "
                         f"per step of the same batch).")
    return lines
