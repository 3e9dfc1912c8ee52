"""`calibrate`: measured runs in, a calibrated cluster spec with its `calibration` record out."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from planner.calibrate import with_params
from planner.calibration.fitting import PEAK_RESERVED, STEP_TIME, Predictor, TargetFit, fit_target
from planner.calibration.runs import MeasuredRun
from planner.engine import EngineSpec
from planner.errors import InputError
from planner.specs import (CalibratedRun, Calibration, CalibrationParameter, ClusterSpec, SkippedParameter)


@dataclass
class CalibrationResult:
    cluster: ClusterSpec          # the input spec with the fitted values and the record
    record: Calibration
    notes: list[str]              # what could not be done (e.g. leave-one-out with too few runs)
    evaluated: int                # run predictions the fit made


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, percent."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    return float(np.mean(np.abs(p / m - 1)) * 100)


def _loo_error(fit: TargetFit, measured: dict[int, float]) -> float | None:
    if not fit.loo:
        return None
    keys = sorted(fit.loo)
    return mape([fit.loo[i] for i in keys], [measured[i] for i in keys])


SPLIT_ROUNDS = 4    # memory-then-time fits at most, while the pipelined runs' default layer splits still move


def calibrate(cluster: ClusterSpec, engine: EngineSpec, runs: Sequence[MeasuredRun],
              compiled: EngineSpec | None = None, only: set[str] | None = None,
              leave_one_out: bool = True,
              on_fold: Callable[[str, int, int], None] | None = None) -> CalibrationResult:
    """Fit the parameters the runs identify (planner/calibration/fitting.py) of `cluster` and `engine`
    (`compiled`: the engine under --compile, for runs that were compiled; `only`: consider these paths only;
    `on_fold(what, done, total)`: the leave-one-out folds of the memory fit, then of the step-time fit)."""
    def follow(what: str):
        return (lambda done, total: on_fold(what, done, total)) if on_fold else None

    pred = Predictor(runs, cluster, engine, compiled)
    every = list(range(len(runs)))
    with_memory = [i for i in every if runs[i].peak_reserved_bytes]
    # the default layer split of a pipelined run depends on the time parameters and sets its memory: fit memory
    # and time in turn, each with the splits held where the other's values put them, until the splits settle
    memory = fit_target(pred, PEAK_RESERVED, with_memory, {}, only, leave_one_out=False)
    time_values: dict[str, float] = {}
    for _ in range(SPLIT_ROUNDS):
        pred.freeze_layer_splits({**memory.values, **time_values})
        held = list(pred.configs)
        time_values = fit_target(pred, STEP_TIME, every, memory.values, only, leave_one_out=False).values
        pred.freeze_layer_splits({**memory.values, **time_values})
        if pred.configs == held:
            break
        memory = fit_target(pred, PEAK_RESERVED, with_memory, time_values, only, leave_one_out=False)
    if leave_one_out:
        memory = fit_target(pred, PEAK_RESERVED, with_memory, time_values, only, leave_one_out,
                            on_fold=follow("peak memory"))
    time = fit_target(pred, STEP_TIME, every, memory.values, only, leave_one_out, on_fold=follow("step time"))
    pred.thaw_layer_splits()      # what the written spec predicts: the split the cost model picks with it
    values = {**memory.values, **time.values}
    skipped = time.selection.skipped + memory.selection.skipped
    if not values:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped if why != "not named by --fit")
        raise InputError(f"these runs identify no parameter to fit ({reasons})", field="--runs")

    before_s, before_b = pred.predict({}, every)
    after_s, after_b = pred.predict(values, every)
    rows = []
    for i, run in enumerate(runs):
        mem = run.peak_reserved_bytes is not None
        rows.append(CalibratedRun(
            label=run.label, config=run.describe(), measured_s=run.step_time_s, before_s=float(before_s[i]),
            after_s=float(after_s[i]), loo_s=time.loo.get(i), measured_peak_bytes=run.peak_reserved_bytes,
            before_peak_bytes=round(before_b[i]) if mem else None, after_peak_bytes=round(after_b[i]) if mem else None,
            loo_peak_bytes=round(memory.loo[i]) if i in memory.loo else None))
    params = [CalibrationParameter(path=c.path, before=c.start, after=values[c.path], lower=c.lower, upper=c.upper,
                                   target=fit.target, reason=c.reason)
              for fit in (time, memory) for c in fit.selection.chosen]
    measured_s = {i: r.step_time_s for i, r in enumerate(runs)}
    measured_b = {i: float(runs[i].peak_reserved_bytes) for i in with_memory}
    record = Calibration(
        engine=engine.name, cluster=cluster.name, runs=rows, parameters=params,
        skipped=[SkippedParameter(path=p, reason=why) for p, why in skipped],
        error_before_pct=mape(before_s, [r.step_time_s for r in runs]),
        error_after_pct=mape(after_s, [r.step_time_s for r in runs]),
        loo_error_pct=_loo_error(time, measured_s),
        memory_error_before_pct=mape(before_b[with_memory], list(measured_b.values())) if with_memory else None,
        memory_error_after_pct=mape(after_b[with_memory], list(measured_b.values())) if with_memory else None,
        memory_loo_error_pct=_loo_error(memory, measured_b))
    fitted = with_params(cluster, values, engine.name)
    note = f"calibrated by meshplan calibrate to {len(runs)} runs of engine {engine.name}"
    description = re.sub(r" ?\(calibrated by meshplan calibrate [^)]*\)$", "", cluster.description)
    fitted = fitted.model_copy(update={"calibration": record, "description": (
        f"{description} ({note})" if description else note)})
    notes = [f"{kind}: {fit.loo_note}" for kind, fit in (("memory", memory), ("step time", time)) if fit.loo_note]
    return CalibrationResult(fitted, record, notes, pred.evaluated)
