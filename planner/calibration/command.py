"""`meshplan calibrate --cluster C [--engine E] --runs FILE... -o calibrated.yaml`: the command and its tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from planner.errors import InputError


def check_output(path: Path, force: bool, field: str = "--output") -> None:
    """Refuse, before any work, an output that exists (without `force`) or that cannot be written."""
    if path.exists() and not force:
        raise InputError(f"'{path}' exists; pass --force to overwrite it", field=field)
    if path.is_dir():
        raise InputError(f"'{path}' is a directory", field=field)
    if not path.resolve().parent.is_dir():
        raise InputError(f"directory '{path.parent}' does not exist", field=field)
    probe = _temporary(path)
    try:                                  # a real write: permissions, read-only mounts, root's special files
        probe.open("x").close()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"'{path}' cannot be written ({exc.strerror})", field=field) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"'{path}' cannot be written (permission denied)", field=field)


def _temporary(path: Path) -> Path:
    """Where the output is written before it replaces `path` (so a failed write leaves `path` as it was)."""
    return path.with_name(path.name + ".tmp")


def write_output(path: Path, text: str) -> None:
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror}", field="--output") from None


def cluster_text(cluster, source: str) -> str:
    """The calibrated cluster as YAML (JSON when the output ends in .json), with a header saying where it came
    from."""
    import json

    import yaml
    data = cluster.model_dump(mode="json")
    if source.endswith(".json"):
        return json.dumps(data, indent=1) + "\n"
    rec = cluster.calibration
    head = (f"# {cluster.name} calibrated by `meshplan calibrate` to {len(rec.runs)} measured runs of engine "
            f"{rec.engine}: the fitted values are in place (engine ones under engine_overrides.{rec.engine}),\n"
            f"# the runs, the values before and after and the errors under `calibration:` at the end. Use it as "
            f"--cluster {source} --engine {rec.engine}.\n")
    return head + yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _pct(predicted: float | None, measured: float | None) -> str:
    if predicted is None or not measured:
        return "-"
    return f"{(predicted / measured - 1) * 100:+.1f}%"


def render(console, record, notes: list[str], output: Path, engine_arg: str) -> None:
    """The fitted parameters, the ones not fitted and why, and every run before, after and left out."""
    from rich.table import Table

    from planner.calibration.parameters import BY_PATH
    from planner.cost.memory import GIB
    with_memory = any(r.measured_peak_bytes for r in record.runs)
    console.print(f"[bold]meshplan calibrate[/]: {record.cluster}, engine {record.engine}, {len(record.runs)} runs"
                  + (f" ({sum(1 for r in record.runs if r.measured_peak_bytes)} with peak reserved memory)"
                     if with_memory else ""), soft_wrap=True)
    fitted = Table("fitted", "before", "after", "bounds", "what, and why", box=None, title_justify="left",
                   title="parameters fitted (the runs identify them)")
    for p in record.parameters:
        at_bound = " (at bound)" if p.after in (p.lower, p.upper) and p.after != p.before else ""
        fitted.add_row(p.path, _fmt(p.before), _fmt(p.after) + at_bound, f"{_fmt(p.lower)} - {_fmt(p.upper)}",
                       f"[dim]{BY_PATH[p.path].what}:[/] {p.reason}")
    console.print(fitted)
    skipped = Table("not fitted", "why", box=None, title="parameters not fitted", title_justify="left")
    for s in record.skipped:
        skipped.add_row(s.path, s.reason)
    console.print(skipped)
    cols = ["run", "configuration", "measured", "before", "after", "left out"]
    if with_memory:
        cols += ["reserved", "before", "after", "left out"]
    runs = Table(*cols, box=None, title_justify="left",
                 title="the runs: measured, and the prediction's error before the fit, after it, and with the run "
                       "left out of the fit")
    for r in record.runs:
        row = [r.label, r.config, f"{r.measured_s * 1e3:,.1f} ms", _pct(r.before_s, r.measured_s),
               _pct(r.after_s, r.measured_s), _pct(r.loo_s, r.measured_s)]
        if with_memory:
            m = r.measured_peak_bytes
            row += ([f"{m / GIB:,.2f} GiB", _pct(r.before_peak_bytes, m), _pct(r.after_peak_bytes, m),
                     _pct(r.loo_peak_bytes, m)] if m else ["-"] * 4)
        runs.add_row(*row)
    console.print(runs)

    def errors(before, after, loo) -> str:
        return (f"mean absolute error {before:.2f}% before, {after:.2f}% after"
                + (f", {loo:.2f}% left out" if loo is not None else ""))
    console.print("step time: " + errors(record.error_before_pct, record.error_after_pct, record.loo_error_pct))
    if record.memory_error_before_pct is not None:
        console.print("peak reserved memory: " + errors(record.memory_error_before_pct, record.memory_error_after_pct,
                                                        record.memory_loo_error_pct))
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"calibrated cluster written to {output}: use it with --cluster {output} --engine {engine_arg}",
                  soft_wrap=True)


def calibrate_command(
    cluster: str = typer.Option(..., "--cluster", "-c", help="The cluster spec to start from: built-in (see "
                                                             "`meshplan clusters`) or a cluster YAML/JSON file."),
    runs: Optional[List[Path]] = typer.Option(
        None, "--runs", "-r", help="Measured runs: `meshplan run --report` files, or JSONL files with one run per "
                                   "line (keys in README, 'Calibrating to measured runs'). Repeat --runs, or list "
                                   "the files after it."),
    more: Optional[List[Path]] = typer.Argument(None, metavar="FILE", show_default=False,
                                                help="More run files (the rest of --runs FILE...)."),
    output: Path = typer.Option(..., "--output", "-o", help="The calibrated cluster file to write (YAML; JSON "
                                                            "when it ends in .json)."),
    engine: str = typer.Option("meshplan", "--engine", "-e",
                               help="The engine that ran the runs, whose host costs are fitted too: meshplan "
                                    "(`meshplan run`), torchtitan, megatron, deepspeed, or an engine YAML file."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Consider only these parameters, comma-separated dotted "
                                                          "paths (e.g. gpu.efficiency.gemm_max,"
                                                          "engine.host.per_kernel_s); default: every candidate "
                                                          "the runs identify."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
):
    """Fit the cluster's physical parameters to measured runs and write a calibrated cluster file.

    Fits, by bounded least squares on log step time, the efficiencies (GEMM, attention, memory), the engine's
    host costs, link efficiencies and latencies and the overlap slow-down that the runs identify (it prints
    which and why), and the allocator margin when runs report peak_reserved_bytes. The written file works with
    every command (--cluster calibrated.yaml) and records the runs, the parameters before and after, and the
    error before, after and with each run left out of the fit.

    Example: meshplan calibrate -c dgx-h100 --runs runs.jsonl run_*.json -o h100-calibrated.yaml
    """
    from planner.calibration.parameters import BY_PATH
    from planner.calibration.result import calibrate
    from planner.calibration.runs import read_runs
    from planner.cli import stdout
    from planner.engine import load_engine
    from planner.loaders import load_cluster

    paths = list(runs or []) + list(more or [])
    if not paths:
        raise InputError("give at least one run file", field="--runs")
    only = None
    if fit is not None:
        only = {p.strip() for p in fit.split(",") if p.strip()}
        unknown = sorted(only - set(BY_PATH))
        if unknown or not only:
            raise InputError(f"'{unknown[0] if unknown else fit}' is not a parameter calibrate fits (one of "
                             f"{', '.join(BY_PATH)})", field="--fit")
    check_output(output, force)
    spec = load_cluster(cluster)
    eng = load_engine(engine)
    measured = read_runs(paths, spec, eng)
    compiled = load_engine(engine, compile=True) if any(r.compile for r in measured) else None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from planner.cli import stderr
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), console=stderr.get(), transient=True) as bar:
        task = bar.add_task("fitting", total=None)
        result = calibrate(spec, eng, measured, compiled, only, on_fold=lambda what, done, total: bar.update(
            task, description=f"{what}: each run left out", completed=done, total=total))
    write_output(output, cluster_text(result.cluster, str(output)))
    render(stdout.get(), result.record, result.notes, output, engine)
