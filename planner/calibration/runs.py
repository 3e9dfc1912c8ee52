"""Measured runs for `meshplan calibrate`: `meshplan run` reports, or JSONL files with one run per line.

The JSONL contract (README "Calibrating to measured runs"; other tools write it): each line one JSON object with
the required keys `model` (a preset name, a ModelSpec or Hugging Face config.json file, or such an object
inline), `nodes`, `gpus_per_node`, `global_batch`, `seq`, `tp`, `pp`, `dp`, `mbs` and `step_time_s` (seconds),
and the optional keys of RunRecord with `meshplan estimate`'s defaults. Unknown keys are an error, and so is
every bad value: one InputError naming the file, the line and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from planner.errors import InputError, MeshplanError
from planner.layout import AXES, DEFAULT_ORDER
from planner.specs import ModelSpec, Optimizer, ParallelConfig, Precision, Recompute, Schedule, TrainingSpec

RUN_REPORT_KIND = "meshplan-run-report"


class RunRecord(BaseModel):
    """One line of a runs file: a measured training run (types are strict: 2, not "2")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | dict[str, Any] = Field(description="Preset name, ModelSpec / config.json file, or either inline.")
    nodes: PositiveInt
    gpus_per_node: PositiveInt
    global_batch: PositiveInt = Field(description="Sequences per optimizer step.")
    seq: PositiveInt = Field(description="Tokens per sequence.")
    tp: PositiveInt
    pp: PositiveInt
    dp: PositiveInt
    mbs: PositiveInt
    step_time_s: PositiveFloat = Field(description="Measured seconds per optimizer step.")
    precision: Precision = "bf16"
    engine: str | None = Field(None, description="The engine that ran it; default the one of --engine.")
    compile: bool = Field(False, description="Run with torch.compile (engines that have it).")
    vpp: PositiveInt = 1
    zero: int = Field(0, ge=0, le=3)
    recompute: Recompute = "none"
    sp: bool = False
    schedule: Schedule = "1f1b"
    optimizer: Optimizer = "adamw"
    layers_per_stage: list[int] | None = None
    peak_reserved_bytes: PositiveInt | None = Field(
        None, description="Measured peak bytes reserved by the framework's allocator (torch.cuda.max_memory_reserved, "
                          "the largest over ranks).")
    name: str | None = Field(None, description="A label for the tables (default: file and line).")


REQUIRED = tuple(k for k, f in RunRecord.model_fields.items() if f.is_required())
OPTIONAL = tuple(k for k in RunRecord.model_fields if k not in REQUIRED)


@dataclass(frozen=True)
class MeasuredRun:
    """A measured run, resolved into the specs the cost model takes."""

    label: str                      # where it came from: "runs.jsonl:3" (file name and line), a report's file name
    model: ModelSpec
    training: TrainingSpec
    nodes: int
    gpus_per_node: int
    config: ParallelConfig
    order: tuple[str, str, str]     # rank layout, fastest-varying axis first
    devices: tuple[int, ...] | None  # device of each rank (a placed plan), None: rank r on device r
    compile: bool
    step_time_s: float              # measured, seconds
    peak_reserved_bytes: int | None  # measured, bytes (None: not measured)

    def describe(self) -> str:
        return f"{self.model.name} {self.config.short()} b{self.training.global_batch} s{self.training.seq_len}"


def _error(where: str, key: str | None, message: str) -> InputError:
    return InputError(message, field=f"{where}: {key}" if key else where)


def _bare(exc: MeshplanError) -> str:
    """The message of an error without its field prefix."""
    text = str(exc)
    return text[len(exc.field) + 2:] if exc.field and text.startswith(exc.field + ": ") else text


def _model(value: str | dict, where: str, base: Path) -> ModelSpec:
    from planner.hf_config import is_hf_config, model_from_hf_config, validated
    from planner.loaders import load_model, parse_spec
    try:
        if isinstance(value, dict):
            if is_hf_config(value):
                return validated(model_from_hf_config(value, "model"), "model")
            return parse_spec(ModelSpec, value, "model")
        # a relative path is tried as given (the working directory), then beside the runs file
        beside = base / value
        return load_model(value if Path(value).exists() or not beside.exists() else str(beside))
    except MeshplanError as exc:
        if isinstance(value, dict) and exc.field and exc.field.startswith("model"):   # a field of the object
            raise _error(where, exc.field.replace(": ", "."), _bare(exc)) from None
        raise _error(where, "model", _bare(exc) if exc.field == "--model" else str(exc)) from None


def _record(data: Any, where: str) -> RunRecord:
    if not isinstance(data, dict):
        raise _error(where, None, "must be a JSON object (one run per line)")
    unknown = [k for k in data if k not in RunRecord.model_fields]
    if unknown:
        raise _error(where, unknown[0], f"unknown key (the keys are {', '.join(REQUIRED)}; optional "
                                        f"{', '.join(OPTIONAL)})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise _error(where, missing[0], "missing required key")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err.get("loc") else None
        got = data.get(key) if key else None
        raise _error(where, key, f"{err['msg']} (got {json.dumps(got)})") from None


def _check(run: MeasuredRun, cluster, engine, where: str) -> None:
    """The same checks `meshplan estimate` makes, named by the runs file's keys."""
    from planner.validate import check_config
    try:
        check_config(run.model, cluster.resized(run.nodes, run.gpus_per_node), run.training, run.config, engine)
    except MeshplanError as exc:
        key = (exc.field or "").lstrip("-").replace("-", "_") or None
        raise _error(where, key, _bare(exc)) from None


def run_from_record(rec: RunRecord, where: str, label: str, base: Path, cluster, engine) -> MeasuredRun:
    """A MeasuredRun from one validated line (`where` it is, for errors; `label` for tables; `base` the folder
    relative model paths may be in), checked against `cluster` resized to its nodes and `engine` (the
    EngineSpec of --engine)."""
    from planner.loaders import parse_spec
    if rec.engine is not None and rec.engine != engine.name:
        raise _error(where, "engine", f"this run is of engine '{rec.engine}', the calibration of '{engine.name}' "
                                      f"(--engine); calibrate one engine at a time")
    if rec.compile and not engine.kernels.compile_fuses:
        raise _error(where, "compile", f"engine {engine.name} has no torch.compile mode")
    model = _model(rec.model, where, base)
    training = parse_spec(TrainingSpec, dict(global_batch=rec.global_batch, seq_len=rec.seq, precision=rec.precision,
                                             optimizer=rec.optimizer), where)
    try:
        cfg = ParallelConfig(tp=rec.tp, pp=rec.pp, dp=rec.dp, vpp=rec.vpp, mbs=rec.mbs, zero=rec.zero,
                             recompute=rec.recompute, sp=rec.sp, schedule=rec.schedule,
                             layers_per_stage=rec.layers_per_stage)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise _error(where, None, msg) from None
    run = MeasuredRun(label=rec.name or label, model=model, training=training, nodes=rec.nodes,
                      gpus_per_node=rec.gpus_per_node, config=cfg, order=DEFAULT_ORDER, devices=None,
                      compile=rec.compile, step_time_s=rec.step_time_s, peak_reserved_bytes=rec.peak_reserved_bytes)
    _check(run, cluster, engine, where)
    return run


def _jsonl(path: Path, text: str, cluster, engine) -> list[MeasuredRun]:
    runs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(where, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise _error(where, None, "nested too deeply") from None
        runs.append(run_from_record(_record(data, where), where, f"{path.name}:{n}", path.parent, cluster,
                                    engine))
    return runs


def _report(path: Path, cluster, engine) -> MeasuredRun:
    """A `meshplan run --report` file: the plan it ran and what it measured."""
    from planner.html_report.inputs import load_run_report
    report = load_run_report(path, field=str(path))
    plan = report.plan
    if plan.engine.name != engine.name:
        raise _error(str(path), "plan.engine", f"this run is of engine '{plan.engine.name}', the calibration of "
                                               f"'{engine.name}' (--engine); calibrate one engine at a time")
    if plan.engine.compile and not engine.kernels.compile_fuses:
        raise _error(str(path), "plan.engine.compile", f"engine {engine.name} has no torch.compile mode")
    step = report.measured.step_time_s
    if not step or step <= 0:
        raise _error(str(path), "measured.step_time_s", "missing: the run timed no step")
    cfg = plan.config
    fields = {k: getattr(cfg, k) for k in ParallelConfig.model_fields}
    order = tuple(cfg.layout) if cfg.layout else DEFAULT_ORDER
    if sorted(order) != sorted(AXES):
        raise _error(str(path), "plan.config.layout", f"{list(order)} must order tp, dp and pp")
    reserved = report.measured.peak_reserved_bytes
    run = MeasuredRun(label=path.name, model=plan.model, training=plan.training, nodes=plan.cluster.num_nodes,
                       gpus_per_node=plan.cluster.gpus_per_node, config=ParallelConfig(**fields), order=order,
                       devices=tuple(cfg.placement) if cfg.placement is not None else None,
                       compile=plan.engine.compile, step_time_s=float(step),
                       peak_reserved_bytes=int(reserved) if reserved else None)
    _check(run, cluster, engine, str(path))
    return run


def read_runs(paths: list[Path], cluster, engine) -> list[MeasuredRun]:
    """Every run of `paths` (run reports and JSONL files, told apart by content), checked against `cluster`
    (resized to each run's nodes) and `engine` (the EngineSpec of --engine)."""
    runs: list[MeasuredRun] = []
    for path in paths:
        if not path.is_file():
            raise InputError(f"no such file '{path}'", field="--runs")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read '{path}': {getattr(exc, 'strerror', None) or exc}", field="--runs") from None
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None        # JSONL, or an error the line-by-line reading names
        if isinstance(whole, dict) and "kind" in whole:
            if whole["kind"] != RUN_REPORT_KIND:
                raise InputError(f"'{path}' is a {whole['kind']!r} file, not a meshplan run report or a JSONL file "
                                 f"of runs", field="--runs")
            runs.append(_report(path, cluster, engine))
            continue
        found = _jsonl(path, text, cluster, engine)
        if not found:
            raise InputError(f"'{path}' holds no runs", field="--runs")
        runs.extend(found)
    return runs
