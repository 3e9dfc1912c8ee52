"""Run reports for the HTML report's tests, built without a launch."""

from __future__ import annotations

from planner.plan import Plan
from runtime.report import build_report


def fake_run_report(plan: Plan, memory_kind: str) -> dict:
    """A run report as runtime.report builds it, from made-up per-rank readings."""
    per_rank = []
    for e in plan.rank_layout:
        times = [0.5 + 0.01 * e.rank + 0.001 * k for k in range(6)]
        cuda = memory_kind == "cuda_max_allocated"
        per_rank.append({"rank": e.rank, "pp": e.pp, "dp": e.dp, "tp": e.tp, "step_times_s": times,
                         "step_time_s": sorted(times[1:])[2], "memory_kind": memory_kind,
                         "peak_memory_bytes": 2**30 + e.rank * 2**20, "peak_reserved_bytes": 2**31 if cuda else None,
                         "baseline_bytes": 2**28, "peak_memory_increase_bytes": 2**29 + e.rank * 2**20})
    run = {"steps": 6, "first_step": 1, "resumed_from_step": None, "device": "cpu", "world_size": len(per_rank)}
    return build_report(plan, run, [6.0 - 0.3 * k for k in range(6)], per_rank)
