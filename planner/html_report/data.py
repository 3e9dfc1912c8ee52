"""The numbers behind each chart of the HTML report, as plain dicts (pure functions; rendering is svg.py).

Units: seconds, bytes. Every figure comes from the plan's prediction, the schedule simulation of its
re-costed configuration (planner/cost/schedule.py), or the run report; nothing is computed twice.
"""

from __future__ import annotations

from planner.cost.model import Core
from planner.cost.params import total_params
from planner.cost.schedule import Op, Timeline, simulate
from planner.html_report.inputs import RunReport
from planner.plan import Plan
from planner.prediction import Predicted, Prediction
from planner.report import TIME_LABELS, why_slower

MEMORY_KINDS = ("params", "grads", "optimizer", "activations", "other")
# the timeline's kinds: device busy (ops and what follows the last backward), the links, and nothing
BUSY_KINDS = ("forward", "backward", "recompute", "communication", "p2p")
POST_KINDS = ("dp_comm", "optimizer", "host")
MAX_BOXES = 1200      # forward/backward operations drawn one by one; above this the timeline is aggregated
TIME_BINS = 120       # time bins per stage row of an aggregated timeline
MERGE_TOLERANCE = 0.12  # adjacent bins whose shares differ by at most this (L1 / 2) merge into one segment


def engine_of(plan: Plan) -> str:
    """The engine the plan is for, as its reports name it (with '(compiled)' under --compile)."""
    return plan.engine.label()


def peak_phase_of(stage) -> str:
    """The phase of the step where a stage's memory peaks."""
    return stage.peak_phase


# ---------------------------------------------------------------------------------------------- summary
def summary_data(plan: Plan) -> dict:
    """The plan in one glance."""
    p, cfg, c, t, m = plan.predicted, plan.config, plan.cluster, plan.training, plan.model
    fullest = max(p.memory.stages, key=lambda s: s.reserved)
    return {
        "model": m.name, "params": total_params(m), "layers": m.num_layers,
        "cluster": c.name, "nodes": c.num_nodes, "gpus_per_node": c.gpus_per_node, "gpu": c.gpu.name,
        "gpus": plan.world_size, "engine": engine_of(plan),
        "global_batch": t.global_batch, "seq_len": t.seq_len, "precision": t.precision, "optimizer": t.optimizer,
        "config": cfg.short(), "microbatches": cfg.num_microbatches, "layout": "-".join(cfg.layout),
        "layers_per_stage": list(cfg.layers_per_stage or []),
        "step_time_s": p.step_time_s, "tokens_per_s": p.tokens_per_s, "mfu": p.mfu,
        "tflops_per_gpu": p.tflops_per_gpu, "hardware_tflops_per_gpu": p.hardware_tflops_per_gpu,
        "peak_memory_bytes": p.peak_memory_bytes, "peak_reserved_bytes": p.peak_reserved_bytes,
        "usable_bytes": p.memory.usable_bytes, "capacity_bytes": p.memory.capacity_bytes,
        "fullest_stage": fullest.stage, "binding": p.binding, "critical_stage": p.critical_stage,
        "feasible": plan.feasible, "reason": plan.reason, "sources": dict(p.sources),
        "search": plan.search.model_dump() if plan.search else None,
    }


# ---------------------------------------------------------------------------------------------- timeline
def simulate_core(core: Core) -> Timeline:
    """The schedule simulation of a costed configuration's per-stage, per-micro-batch work."""
    w = core.work
    fwd = [[w.forward(i, c) for c in range(w.vpp)] for i in range(w.pp)]
    bwd = [[w.backward(i, c) for c in range(w.vpp)] for i in range(w.pp)]
    return simulate(core.cfg.schedule, core.nmb, fwd, bwd, w.link_delays)


def timeline_data(plan: Plan, core: Core, max_boxes: int = MAX_BOXES, bins: int = TIME_BINS) -> dict:
    """One step, a row per pipeline stage: the simulated operations and their pieces (past `max_boxes`
    operations, time bins merged into segments with the seconds of each kind instead), the link transfers,
    and what follows each stage's last backward as the cost model charges it: data-parallel communication
    (with the parameter gathers the step exposes before its first forward), the optimizer, the engine's host
    time per step. Seconds throughout."""
    w, cfg = core.work, plan.config
    tl = simulate_core(core)
    pipe = tl.makespan
    last = [max((o.end for o in tl.rows[i]), default=0.0) for i in range(w.pp)]
    tail_end = max(last[i] + w.post_comm[i] + w.post_opt[i] for i in range(w.pp))
    post = []
    for i in range(w.pp):
        a = last[i] + w.pre_comm
        b = a + w.post_comm[i]
        c = b + w.post_opt[i]
        post.append([{"kind": "dp_comm", "start": last[i], "end": b}, {"kind": "optimizer", "start": b, "end": c},
                     {"kind": "host", "start": tail_end + w.pre_comm, "end": tail_end + w.pre_comm + w.host_step}])
    step = tail_end + w.pre_comm + w.host_step
    ops = 2 * core.nmb * w.vpp * w.pp
    aggregated = ops > max_boxes
    stages = []
    for i in range(w.pp):
        busy = {k: 0.0 for k in BUSY_KINDS + POST_KINDS}
        busy.update(tl.busy(i))
        for e in post[i]:
            busy[e["kind"]] += e["end"] - e["start"]
        stages.append({"stage": i, "layers": sum(w.chunk_layers[i]), "busy": busy,
                       "idle": step - sum(busy.values()), "post": [e for e in post[i] if e["end"] > e["start"]]})
    out = {
        "schedule": cfg.schedule, "pp": w.pp, "vpp": w.vpp, "microbatches": core.nmb, "operations": ops,
        "p2p_s": w.p2p, "hops_s": list(w.hops), "pipeline_s": pipe, "step_s": step,
        "closed_form_pipeline_s": w.pipeline_s, "closed_form_step_s": core.step,
        "predicted_step_s": plan.predicted.step_time_s,
        "critical_stage": core.crit, "stages": stages, "aggregated": aggregated,
    }
    if aggregated:
        out["bin_s"] = pipe / bins
        out["segments"] = [aggregate_row(tl.rows[i], pipe, bins) for i in range(w.pp)]
        out["ops"], out["transfers"] = [], []
    else:
        out["ops"] = [{"stage": o.device, "chunk": o.chunk, "microbatch": o.microbatch, "op": o.op,
                       "start": o.start, "end": o.end,
                       "pieces": [{"kind": k, "start": a, "end": b} for k, a, b in o.parts()]} for o in tl.ops]
        out["transfers"] = [{"src": t.src, "dst": t.dst, "microbatch": t.microbatch, "what": t.what,
                             "start": t.start, "end": t.end} for t in tl.transfers]
    return out


def aggregate_row(ops: list[Op], end: float, bins: int) -> list[dict]:
    """One stage's operations over the pipeline phase [0, end) cut into `bins` equal bins, each holding the
    seconds of every kind (idle: the rest), then adjacent bins of nearly the same mix merged: segments of
    {start, end, seconds by kind, microbatches: [first, last] or []}."""
    width = end / bins
    acc = [{"idle": width} for _ in range(bins)]
    span: list[list[int]] = [[] for _ in range(bins)]
    for o in ops:
        for kind, start, stop in o.parts():
            for b in range(int(start / width), min(bins - 1, int(stop / width)) + 1):
                overlap = min(stop, (b + 1) * width) - max(start, b * width)
                if overlap > 0:
                    acc[b][kind] = acc[b].get(kind, 0.0) + overlap
                    acc[b]["idle"] -= overlap
                    span[b].append(o.microbatch)
    segments: list[dict] = []
    for b in range(bins):
        seconds = {k: max(v, 0.0) for k, v in acc[b].items()}
        mbs = span[b] + (segments[-1]["microbatches"] if segments else [])
        if segments and _mix_distance(segments[-1]["seconds"], seconds) <= MERGE_TOLERANCE:
            seg = segments[-1]
            seg["end"] = (b + 1) * width
            for k, v in seconds.items():
                seg["seconds"][k] = seg["seconds"].get(k, 0.0) + v
            seg["microbatches"] = [min(mbs), max(mbs)] if mbs else []
        else:
            segments.append({"start": b * width, "end": (b + 1) * width, "seconds": seconds,
                             "microbatches": [min(span[b]), max(span[b])] if span[b] else []})
    return segments


def _mix_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Half the L1 distance between two mixes of kinds as shares (0: same mix, 1: disjoint)."""
    ta, tb = sum(a.values()) or 1.0, sum(b.values()) or 1.0
    return 0.5 * sum(abs(a.get(k, 0.0) / ta - b.get(k, 0.0) / tb) for k in set(a) | set(b))


# ---------------------------------------------------------------------------------------------- memory
def memory_data(pred: Predicted) -> dict:
    """Bytes per GPU of each stage by kind, the allocator margin on top, and the device's limits."""
    mem = pred.memory
    stages = [{"stage": s.stage, "layers": s.layers, "parts": {k: getattr(s, k) for k in MEMORY_KINDS},
               "total": s.total, "reserved": s.reserved, "margin": s.reserved - s.total,
               "peak_phase": peak_phase_of(s), "fits": s.reserved <= mem.usable_bytes} for s in mem.stages]
    return {"capacity_bytes": mem.capacity_bytes, "usable_bytes": mem.usable_bytes, "stages": stages,
            "fullest_stage": max(mem.stages, key=lambda s: s.reserved).stage}


# ---------------------------------------------------------------------------------------------- step time
def breakdown_data(pred: Predicted) -> dict:
    """The step's seconds on the critical path by part (they sum to the step time)."""
    time = pred.time.model_dump()
    return {"step_time_s": pred.step_time_s,
            "parts": [{"key": k, "label": label, "seconds": time[k], "share": time[k] / pred.step_time_s}
                      for k, label in TIME_LABELS.items()]}


def alternatives_data(plan: Plan) -> dict:
    """The chosen configuration and the runners-up: step time by part, and why each is slower."""
    winner = Prediction(feasible=plan.feasible, reason=plan.reason, config=plan.config, predicted=plan.predicted)
    best = plan.predicted.step_time_s
    rows = []
    for rank, p in enumerate([winner, *plan.alternatives], 1):
        q = p.predicted
        rows.append({"rank": rank, "config": p.config.short(), "layout": "-".join(p.config.layout),
                     "step_time_s": q.step_time_s, "slower": q.step_time_s / best - 1, "tokens_per_s": q.tokens_per_s,
                     "mfu": q.mfu, "peak_reserved_bytes": q.peak_reserved_bytes, "feasible": p.feasible,
                     "time": q.time.model_dump(), "why": "chosen" if rank == 1 else why_slower(winner, p)})
    return {"rows": rows, "labels": dict(TIME_LABELS)}


# ---------------------------------------------------------------------------------------------- run
def run_data(plan: Plan, report: RunReport) -> dict:
    """Measured against predicted: step time and memory per rank, and the loss curve."""
    m = report.measured
    cpu = m.memory_kind == "cpu_peak_rss"
    stages = {s.stage: s for s in plan.predicted.memory.stages}
    ranks = []
    for r in sorted(m.per_rank, key=lambda r: r.rank):
        ranks.append({"rank": r.rank, "pp": r.pp, "dp": r.dp, "tp": r.tp, "step_time_s": r.step_time_s,
                      "step_times_s": list(r.step_times_s),
                      "memory_bytes": r.peak_memory_increase_bytes if cpu else r.peak_memory_bytes,
                      "predicted_memory_bytes": stages[r.pp].total})
    first = int(report.run.get("first_step", 1) or 1)
    return {
        "device": report.run.get("device", "?"), "world_size": len(m.per_rank), "steps": len(report.losses),
        "memory_label": ("peak RSS increase over the baseline (CPU)" if cpu
                         else "CUDA max memory allocated"),
        "predicted_step_time_s": plan.predicted.step_time_s, "measured_step_time_s": m.step_time_s,
        "ranks": ranks,
        "losses": [{"step": first + k, "loss": x} for k, x in enumerate(report.losses)],
        "figures": [{"key": k, "predicted": report.predicted.get(k), "error_pct": report.error_pct.get(k),
                     "measured": m.peak_memory_increase_bytes if (cpu and k == "peak_memory_bytes")
                     else getattr(m, k)}
                    for k in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes")],
    }


def page_data(plan: Plan, core: Core, run: RunReport | None = None) -> dict:
    """Everything the page draws."""
    return {"summary": summary_data(plan), "timeline": timeline_data(plan, core),
            "memory": memory_data(plan.predicted), "breakdown": breakdown_data(plan.predicted),
            "alternatives": alternatives_data(plan), "run": run_data(plan, run) if run is not None else None}
