"""`meshplan report PLAN [--run RUN_REPORT] -o report.html`, and the checks `plan --html` / `run --html` share."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from planner.errors import InputError


def check_output(path: Path, force: bool, field: str) -> None:
    """Refuse, before any work, an output that exists (without `force`) or whose directory does not."""
    if path.exists() and not force:
        raise InputError(f"'{path}' exists; pass --force to overwrite it", field=field)
    if not path.resolve().parent.is_dir():
        raise InputError(f"directory '{path.parent}' does not exist", field=field)


def _read_plan_or_run(path: Path):
    """(plan, run report or None) from a plan file or a run report (which holds its plan)."""
    from planner.html_report.inputs import RUN_REPORT_KIND, load_run_report
    from planner.loaders import read_data_file
    from planner.plan import load_plan
    if path.suffix in (".json", ".yaml", ".yml") and read_data_file(path, "PLAN").get("kind") == RUN_REPORT_KIND:
        run = load_run_report(path, field="PLAN")
        return run.plan, run
    return load_plan(path), None


def report_command(
    plan: Path = typer.Argument(..., help="Plan file (`meshplan plan -o` / `estimate -o`), or a run report from "
                                          "`meshplan run --report` (it holds its plan)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run report of this plan (`meshplan run --report`): "
                                                           "adds measured against predicted."),
    output: Path = typer.Option(..., "--output", "-o", help="The HTML file to write."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="The `meshplan profile model` file the plan was "
                                                                   "made with, to re-cost it the same way."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
):
    """Draw a plan (and a run of it) as one self-contained HTML page that opens offline.

    The page shows the plan at a glance, the pipeline timeline of one step, memory per stage, the step-time
    breakdown, the alternatives, and with --run the measured step time, memory and loss.

    Example: meshplan report plan.json --run run.json -o report.html
    """
    from rich.console import Console

    from planner.cli import write_new_file
    from planner.html_report import build_html
    from planner.html_report.inputs import check_run_matches, evaluate_plan, load_run_report

    check_output(output, force, "--output")
    the_plan, embedded = _read_plan_or_run(plan)
    report = load_run_report(run, the_plan) if run is not None else embedded
    if report is not None:
        check_run_matches(report, the_plan)
    measured = None
    if profile is not None:
        from planner.profile_data import load_profile
        measured = load_profile(profile)
    core = evaluate_plan(the_plan, measured, profile.name if profile else "profile")
    html = build_html(the_plan, report, core)
    write_new_file(output, html, force, "--output")
    Console(highlight=False).print(f"report written to {output} ({len(html.encode()) / 1024:,.0f} KiB)",
                                   soft_wrap=True)
