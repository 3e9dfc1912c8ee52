"""What the HTML report reads: a plan, optionally a run report, and the plan's configuration re-costed so the
timeline has the per-stage, per-micro-batch times behind the plan's step time."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from planner.cost.model import Core, CostModel
from planner.errors import InputError
from planner.plan import Plan
from planner.profile_data import ModelProfile
from planner.specs import ParallelConfig

RUN_REPORT_KIND = "meshplan-run-report"
RUN_REPORT_VERSION = 1          # runtime.report.REPORT_SCHEMA_VERSION (runtime/ is not imported by planner/)


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RankMeasured(_Read):
    rank: int
    pp: int
    dp: int
    tp: int
    step_times_s: list[float] = []
    step_time_s: float | None = None
    memory_kind: str | None = None
    peak_memory_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    peak_memory_increase_bytes: float | None = None


class Measured(_Read):
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    peak_memory_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    peak_memory_increase_bytes: float | None = None
    memory_kind: str | None = None
    per_rank: list[RankMeasured]


class RunReport(_Read):
    """The parts of `meshplan run --report` (README "Run report") the page draws."""

    schema_version: int
    kind: str
    plan: Plan
    config: str
    run: dict
    losses: list[float]
    measured: Measured
    predicted: dict[str, float | None]
    error_pct: dict[str, float | None]


def load_run_report(path: Path, plan: Plan | None = None, field: str = "--run") -> RunReport:
    """Read and validate a run report; InputError (exit 2) if it is not one, or is for another configuration
    than `plan`'s."""
    from planner.loaders import load_versioned
    report = load_versioned(path, field, RunReport, RUN_REPORT_VERSION, kind=RUN_REPORT_KIND,
                            what="meshplan run report (from `meshplan run --report`)")
    check_run_matches(report, plan, field)
    return report


def check_run_matches(report: RunReport, plan: Plan | None, field: str = "--run") -> None:
    if plan is not None and report.plan.config != plan.config:
        raise InputError(f"the run report is for {report.plan.config.short()}, the plan for "
                         f"{plan.config.short()}", field=field)


def evaluate_plan(plan: Plan, profile: ModelProfile | None = None, profile_name: str = "profile") -> Core:
    """The plan's configuration re-costed by this meshplan's cost model (same specs, layer split, rank order
    and placement): the per-stage times the timeline simulates."""
    cost = CostModel(plan.model, plan.cluster, plan.training, profile, profile_name, engine=plan.engine)
    cfg = ParallelConfig(**{k: getattr(plan.config, k) for k in ParallelConfig.model_fields})
    devices = tuple(plan.config.placement) if plan.config.placement is not None else None
    return cost.evaluate_core(cfg, tuple(plan.config.layout), devices)
