"""The run report: measured against predicted, as JSON (schema in docs/runtime.md) and as a table.

Pure Python (no torch), so `meshplan run` can render a report the ranks wrote.
"""

from __future__ import annotations

import statistics

from planner.cost.flops import model_flops_per_step
from planner.cost.kernels import Dtypes
from planner.engine import run_precision
from planner.plan import Plan

REPORT_SCHEMA_VERSION = 1
FIGURES = ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes")


def median_excluding_first(times: list[float]) -> float | None:
    """Median step time without the first (warm-up) step; the only step when there is one; None if none."""
    if not times:
        return None
    return statistics.median(times[1:] if len(times) > 1 else times)


def aggregate_step_time(per_rank: list[dict]) -> float | None:
    """Median over steps (the first excluded when there are more) of the slowest rank's time for that
    step, seconds."""
    lists = [r["step_times_s"] for r in per_rank if r.get("step_times_s")]
    if not lists:
        return None
    n = min(len(t) for t in lists)
    return median_excluding_first([max(t[i] for t in lists) for i in range(n)])


def error_pct(measured: float | None, predicted: float | None) -> float | None:
    """100 * (measured - predicted) / predicted; None when either is missing or predicted is 0."""
    if measured is None or not predicted:
        return None
    return 100.0 * (measured - predicted) / predicted


def mean_peak(plan: Plan, dtype: str) -> float:
    """Dense peak FLOP/s per GPU, averaged over the GPUs the plan's ranks run on (node groups mix types)."""
    if not plan.cluster.heterogeneous:
        return plan.cluster.gpu.peak(dtype)
    types = [row.gpu_type for row in plan.rank_layout]
    return sum(plan.cluster.gpu_types[t].peak(dtype) for t in types) / len(types)


def build_report(plan: Plan, run: dict, losses: list[float], per_rank: list[dict]) -> dict:
    """The run-report object. `run`: how it ran (steps, seed, device, ...); `per_rank`: each rank's
    coordinate, step times and memory readings (runtime.metrics)."""
    tr, cfg = plan.training, plan.config
    step = aggregate_step_time(per_rank)
    world = len(per_rank)
    flops = model_flops_per_step(plan.model, tr.global_batch, tr.seq_len)
    ran = run.get("precision_run") or run_precision(tr.precision, run.get("device", "cuda"))
    peak = mean_peak(plan, Dtypes.of(ran).matmul)          # of the precision the GEMMs ran in
    mem_kind = per_rank[0]["memory_kind"] if per_rank else None
    peak_mem = max((r["peak_memory_bytes"] for r in per_rank), default=None)
    reserved = [r["peak_reserved_bytes"] for r in per_rank if r.get("peak_reserved_bytes") is not None]
    increase = max((r["peak_memory_increase_bytes"] for r in per_rank), default=None)
    measured = {
        "step_time_s": step,
        "tokens_per_s": tr.tokens_per_step / step if step else None,
        "tflops_per_gpu": flops / (step * world) / 1e12 if step else None,
        "mfu": flops / (step * world * peak) if step else None,
        "peak_memory_bytes": peak_mem,
        "peak_reserved_bytes": max(reserved) if reserved else None,
        "peak_memory_increase_bytes": increase,
        "memory_kind": mem_kind,
        "per_rank": per_rank,
    }
    pred = plan.predicted
    predicted = {"step_time_s": pred.step_time_s, "tokens_per_s": pred.tokens_per_s,
                 "tflops_per_gpu": pred.tflops_per_gpu, "mfu": pred.mfu,
                 "peak_memory_bytes": pred.peak_memory_bytes, "peak_reserved_bytes": pred.peak_reserved_bytes}
    # on CPU the comparable figure is the RSS increase over the baseline, not the whole process RSS
    mem_measured = increase if mem_kind == "cpu_peak_rss" else peak_mem
    errors = {k: error_pct(measured[k], predicted[k]) for k in FIGURES if k != "peak_memory_bytes"}
    errors["peak_memory_bytes"] = error_pct(mem_measured, predicted["peak_memory_bytes"])
    if measured["peak_reserved_bytes"] is not None:
        errors["peak_reserved_bytes"] = error_pct(measured["peak_reserved_bytes"], predicted["peak_reserved_bytes"])
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "meshplan-run-report",
        "plan": plan.model_dump(mode="json"),
        "config": cfg.short(),
        "run": run,
        "losses": losses,
        "measured": measured,
        "predicted": predicted,
        "error_pct": errors,
        "memory_compared": ("measured.peak_memory_increase_bytes (CPU peak RSS over the baseline)"
                            if mem_kind == "cpu_peak_rss" else "measured.peak_memory_bytes (CUDA max allocated)"),
    }


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("bytes"):
        return f"{value / 2**20:,.1f} MiB"
    if key == "step_time_s":
        return f"{value * 1e3:,.1f} ms"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "mfu":
        return f"{value:.2%}"
    if key == "tflops_per_gpu":
        return f"{value:.4f}"
    return str(value)


def render_report(console, report: dict) -> None:
    """Print the measured-vs-predicted table (rich console)."""
    from rich.table import Table

    m, p, e = report["measured"], report["predicted"], report["error_pct"]
    run = report["run"]
    title = (f"meshplan run: {report['plan']['model']['name']} {report['config']}, {run['world_size']} ranks on "
             f"{run['device']}, {len(report['losses'])} steps")
    table = Table("figure", "predicted", "measured", "error", title=title, box=None, title_justify="left")
    rows = [("step time (median, first step excluded)", "step_time_s"), ("tokens/s", "tokens_per_s"),
            ("model TFLOP/s per device", "tflops_per_gpu"), ("MFU", "mfu")]
    for label, key in rows:
        table.add_row(label, _fmt(key, p[key]), _fmt(key, m[key]), _err(e.get(key)))
    if m["memory_kind"] == "cpu_peak_rss":
        table.add_row("peak memory: RSS increase (max rank)", _fmt("bytes", p["peak_memory_bytes"]),
                      _fmt("bytes", m["peak_memory_increase_bytes"]), _err(e.get("peak_memory_bytes")))
        table.add_row("peak memory: whole-process RSS", "-", _fmt("bytes", m["peak_memory_bytes"]), "")
    else:
        table.add_row("peak memory allocated (max rank)", _fmt("bytes", p["peak_memory_bytes"]),
                      _fmt("bytes", m["peak_memory_bytes"]), _err(e.get("peak_memory_bytes")))
        table.add_row("peak memory reserved (max rank)", _fmt("bytes", p["peak_reserved_bytes"]),
                      _fmt("bytes", m["peak_reserved_bytes"]), _err(e.get("peak_reserved_bytes")))
    console.print(table)
    losses = report["losses"]
    if losses:
        first = run.get("first_step", 1)
        console.print(f"loss: step {first} {losses[0]:.4f} -> step {first + len(losses) - 1} {losses[-1]:.4f}")


def _err(value) -> str:
    return "-" if value is None else f"{value:+.1f}%"
