"""Which parameters measured runs identify, their bounded least-squares fit, and the leave-one-out check.

Each measurement (a run's step time, and its peak reserved bytes when measured) is predicted by the cost model
with the cluster's parameters; the fit minimises sum_i log(predicted_i / measured_i)^2 (scipy's trust-region
reflective least squares within the physical bounds), so every run weighs the same whatever its length.
Step time and reserved memory are fitted separately: no parameter moves both.

Choosing the parameters (`choose`): a candidate (planner/calibration/parameters.py) is dropped when the runs
cannot exercise it (a structural reason: one node, no collective, ...), when dividing or multiplying it by PROBE
moves no run's prediction by EXERCISED, or when its effect on the runs is, to within SEPARABLE, a combination of the
effects of the parameters chosen before it. The order is that of orthogonal matching pursuit over the vectors of
log-prediction changes: next comes the parameter whose effect, less what those chosen explain, lines up best with
the misfit still unexplained; so of two parameters with nearly the same effect, the one that explains the
measurements is fitted (ties keep the candidates' order, most physical first). Once fitted, the choice is made
again at the fitted point (where the probes see the runs as the fit does); its parameters, fitted from the same
start, replace the first ones when they fit the runs better. The leave-one-out check makes the choice again
without the run it predicts: a choice the full fit made (first or second) refits the full fit's parameters from
its point, another is fitted as a whole (second choice included). When the choice takes as many parameters as
there are runs and others are left, the runs cannot tell them apart: that is an error naming how many runs the
exercised parameters need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from planner.calibrate import get_param, with_params
from planner.calibration.parameters import BY_PATH, CANDIDATES, Candidate
from planner.calibration.runs import MeasuredRun
from planner.cost.model import CostModel
from planner.engine import EngineSpec
from planner.errors import InputError
from planner.specs import ClusterSpec

STEP_TIME, PEAK_RESERVED = "step_time", "peak_reserved"
EXERCISED = 0.02    # dividing or multiplying a parameter by PROBE must move some run's prediction by 2% or more
PROBE = 4.0         # far enough that a parameter well off its start (a host cost 10x) still shows
NEAR = 2.0          # the probes whose log-prediction change is the direction of a parameter's effect
SEPARABLE = 0.5     # share (norm) of a parameter's effect not explained by those chosen before it
EXPLAINED = 1e-3    # root-mean-square log misfit below which the choice no longer follows the misfit
DIFF_STEP = 1e-4    # forward-difference step of the Jacobian, relative to the parameter's value
SIGNIFICANT = 6     # digits the fitted values are written with
# least squares stops when a step lowers the cost by less than COST_TOLERANCE of it (the cost model has kinks, where
# host and device time or communication and compute swap roles, along which it would crawl), or moves the
# parameters by less than STEP_TOLERANCE of their values
COST_TOLERANCE = 1e-4
STEP_TOLERANCE = 1e-6


class Predictor:
    """Predicted step time (seconds) and peak reserved bytes of measured runs on one cluster and engine, for any
    values of the dotted-path parameters. Runs sharing model, training, size and --compile share a CostModel
    (and so its per-block caches) within one prediction."""

    def __init__(self, runs: Sequence[MeasuredRun], cluster: ClusterSpec, engine: EngineSpec,
                 compiled: EngineSpec | None = None):
        self.runs, self.cluster, self.engine = list(runs), cluster, engine
        self.engines = {False: engine, True: compiled}
        keys: dict[tuple, int] = {}
        self.group = [keys.setdefault((r.model, r.training, r.nodes, r.gpus_per_node, r.compile), len(keys))
                      for r in self.runs]
        self.evaluated = 0   # run predictions made, for the benchmark
        self.configs = [r.config for r in self.runs]   # as predicted: the layer split may be held (below)
        self._seen: dict[tuple, tuple[float, float]] = {}   # (values, run index) -> (step, reserved)

    def freeze_layer_splits(self, values: dict[str, float]) -> None:
        """Hold the layer split of pipelined runs without one at what the cost model picks with `values`: the
        default split moves in whole layers as the parameters change, a step the least squares cannot follow."""
        cluster = self.cluster_with(values)
        for i, run in enumerate(self.runs):
            if run.config.pp > 1 and run.config.layers_per_stage is None:
                cost = CostModel(run.model, cluster.resized(run.nodes, run.gpus_per_node), run.training,
                                 engine=self.engines[run.compile])
                chunks = cost.evaluate_core(run.config, run.order, run.devices).chunks
                self.configs[i] = run.config.model_copy(update={"layers_per_stage": list(chunks)})
        self._seen.clear()

    def thaw_layer_splits(self) -> None:
        self.configs = [r.config for r in self.runs]
        self._seen.clear()

    def cluster_with(self, values: dict[str, float]) -> ClusterSpec:
        return with_params(self.cluster, values, self.engine.name) if values else self.cluster

    def predict(self, values: dict[str, float], indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(step seconds, peak reserved bytes) of runs `indices` with the parameters `values` (each run's
        prediction at a point kept: the choice probes the same points for every leave-one-out fold)."""
        point = tuple(sorted(values.items()))
        cluster = None
        models: dict[int, CostModel] = {}
        steps, reserved = np.empty(len(indices)), np.empty(len(indices))
        for j, i in enumerate(indices):
            seen = self._seen.get((point, i))
            if seen is not None:
                steps[j], reserved[j] = seen
                continue
            cluster = cluster or self.cluster_with(values)
            run = self.runs[i]
            cost = models.get(self.group[i])
            if cost is None:
                cost = models[self.group[i]] = CostModel(run.model, cluster.resized(run.nodes, run.gpus_per_node),
                                                         run.training, engine=self.engines[run.compile])
            core = cost.evaluate_core(self.configs[i], run.order, run.devices)
            steps[j], reserved[j] = self._seen[(point, i)] = core.step, core.peak_reserved
            self.evaluated += 1
        return steps, reserved

    def measured(self, target: str, indices: Sequence[int]) -> np.ndarray:
        return np.array([self.runs[i].step_time_s if target == STEP_TIME else self.runs[i].peak_reserved_bytes
                         for i in indices], dtype=float)


@dataclass(frozen=True)
class Choice:
    """A parameter to fit: its path, current value, bounds and why it was chosen."""

    path: str
    start: float
    lower: float
    upper: float
    reason: str


@dataclass
class Selection:
    chosen: list[Choice] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, why not)


def _probes(cand: Candidate, start: float, factor: float) -> tuple[float, float]:
    """The values a parameter is probed at: its value divided and multiplied by `factor`, within its bounds (the
    lowest tenth of its range when it is 0)."""
    lower, upper = cand.bounds(start)
    if start > 0:
        return max(lower, start / factor), min(upper, factor * start)
    return lower, lower + (upper - lower) / 10


def choose(pred: Predictor, target: str, indices: Sequence[int], base: dict[str, float],
           only: set[str] | None = None) -> Selection:
    """The parameters of `target` the runs `indices` identify (see the module docstring), probed around the
    cluster with `base` applied."""
    sel = Selection()
    cluster = pred.cluster_with(base)
    runs = [pred.runs[i] for i in indices]
    effects: dict[str, np.ndarray] = {}
    starts: dict[str, float] = {}
    what = "step time" if target == STEP_TIME else "peak reserved memory"
    pick = 0 if target == STEP_TIME else 1
    for cand in (c for c in CANDIDATES if c.target == target):
        if only is not None and cand.path not in only:
            sel.skipped.append((cand.path, "not named by --fit"))
            continue
        reason = cand.condition(runs, cluster, pred.engine) if cand.condition else None
        if reason:
            sel.skipped.append((cand.path, reason))
            continue
        start = get_param(cluster, cand.path, pred.engine)
        # whether the runs feel it at all: far probes; the direction of its effect: near ones (where the
        # cost model is close to linear in the log of the parameter)
        far = [pred.predict({**base, cand.path: v}, indices)[pick] for v in _probes(cand, start, PROBE)]
        moved = float(np.max(np.abs(np.log(far[1] / far[0]))))
        near = [pred.predict({**base, cand.path: v}, indices)[pick] for v in _probes(cand, start, NEAR)]
        effect = np.log(near[1] / near[0])
        if not np.any(effect):          # flat near its value (a kink, a bound): the far probes' direction
            effect = np.log(far[1] / far[0])
        if moved < EXERCISED:
            sel.skipped.append((cand.path, f"dividing or multiplying it by {PROBE:g} moves no run's {what} by "
                                           f"{EXERCISED:.0%} (at most {moved:.1%})"))
            continue
        effects[cand.path], starts[cand.path] = effect, start
    # orthogonal matching pursuit: next comes the parameter whose own effect (what the parameters chosen so far
    # do not explain) best explains the misfit still left, log(predicted / measured) at `base`
    misfit = np.log(pred.predict(base, indices)[pick] / pred.measured(target, indices))
    own = dict(effects)                    # each parameter's effect less its projection on those chosen
    left: dict[str, float] = {}            # not separable: the share of its effect that is its own
    while own:
        separable = {p: v for p, v in own.items()
                     if np.linalg.norm(v) >= SEPARABLE * np.linalg.norm(effects[p])}
        left.update({p: float(np.linalg.norm(own.pop(p)) / np.linalg.norm(effects[p]))
                     for p in list(own) if p not in separable})
        if not separable:
            break
        if np.linalg.norm(misfit) < EXPLAINED * np.sqrt(len(misfit)):
            misfit = np.zeros_like(misfit)   # explained: the rest keep the candidates' order
        path = max(separable, key=lambda p: abs(float(separable[p] @ misfit)) / np.linalg.norm(separable[p]))
        rest = own.pop(path)
        ratio = float(np.linalg.norm(rest) / np.linalg.norm(effects[path]))
        q = rest / np.linalg.norm(rest)     # the new direction, orthogonal to those chosen before
        own = {p: v - (q @ v) * q for p, v in own.items()}
        misfit = misfit - (q @ misfit) * q
        effect = effects[path]
        worst = int(np.argmax(np.abs(effect)))
        lower, upper = BY_PATH[path].bounds(starts[path])
        sel.chosen.append(Choice(path, starts[path], lower, upper,
                                 f"moves {runs[worst].label}'s {what} by {abs(effect[worst]):.0%} when halved or "
                                 f"doubled"
                                 + (f"; {ratio:.0%} of its effect is its own" if ratio < 0.995 else "")))
    if left and len(sel.chosen) >= len(indices):   # as many parameters as runs: the runs can tell no more apart
        runs_word = "runs" if target == STEP_TIME else "runs with peak_reserved_bytes"
        raise InputError(f"{len(indices)} {runs_word} cannot fit the {len(effects)} parameters they exercise "
                         f"({', '.join(effects)}): give at least {len(effects)} such runs, or name fewer with --fit",
                         field="--runs")
    for path, ratio in left.items():
        effect = effects[path]
        corr = {c.path: abs(float(effects[c.path] @ effect)) / (np.linalg.norm(effects[c.path])
                                                                  * np.linalg.norm(effect)) for c in sel.chosen}
        like = " and ".join(sorted(corr, key=corr.get, reverse=True)[:2])
        sel.skipped.append((path, f"only {ratio:.0%} of its effect on these runs' {what} is its own, the rest is "
                                  f"that of {like}: not separable with these runs"))
    order = [c.path for c in CANDIDATES]
    sel.skipped.sort(key=lambda s: order.index(s[0]))
    return sel


class _Problem:
    """log(predicted / measured) of some runs as a function of the chosen parameters in scaled units (each
    parameter divided by its start value, or by its range when that is 0), with the Jacobian by forward
    differences, both cached by point: the rows of one run do not depend on the others, so a leave-one-out refit
    starting at the full fit reuses them."""

    def __init__(self, pred: Predictor, target: str, chosen: Sequence[Choice], base: dict[str, float]):
        self.pred, self.target, self.chosen, self.base = pred, target, list(chosen), base
        self.scale = np.array([c.start if c.start > 0 else (c.upper - c.lower) or 1.0 for c in chosen])
        self.lower = np.array([c.lower for c in chosen]) / self.scale
        self.upper = np.array([c.upper for c in chosen]) / self.scale
        self._values: dict[bytes, dict[int, float]] = {}
        self._rows: dict[bytes, dict[int, np.ndarray]] = {}

    def values(self, u: np.ndarray) -> dict[str, float]:
        return {**self.base, **{c.path: float(v) for c, v in zip(self.chosen, u * self.scale)}}

    def predicted(self, u: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """Predictions of runs `indices` at point u (each run computed once per point)."""
        cache = self._values.setdefault(u.tobytes(), {})
        missing = [i for i in indices if i not in cache]
        if missing:
            out = self.pred.predict(self.values(u), missing)[0 if self.target == STEP_TIME else 1]
            cache.update(zip(missing, out))
        return np.array([cache[i] for i in indices])

    def residuals(self, u: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        return np.log(self.predicted(u, indices) / self.pred.measured(self.target, indices))

    def jacobian(self, u: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """d residuals / d u at u (forward differences; backward at an upper bound)."""
        rows = self._rows.setdefault(u.tobytes(), {})
        missing = [i for i in indices if i not in rows]
        if missing:
            at = np.log(self.predicted(u, missing))
            cols = []
            for k in range(len(u)):
                h = DIFF_STEP * max(abs(u[k]), 1e-2)
                if u[k] + h > self.upper[k]:
                    h = -h
                v = u.copy()
                v[k] += h
                cols.append((np.log(self.predicted(v, missing)) - at) / h)
            rows.update(zip(missing, np.array(cols).T))
        return np.array([rows[i] for i in indices])

    def solve(self, indices: Sequence[int], start: np.ndarray) -> np.ndarray:
        """The least-squares point of runs `indices`, from `start`."""
        from scipy.optimize import least_squares
        res = least_squares(lambda u: self.residuals(u, indices), np.clip(start, self.lower, self.upper),
                            jac=lambda u: self.jacobian(u, indices), bounds=(self.lower, self.upper), method="trf",
                            x_scale=1.0, ftol=COST_TOLERANCE, xtol=STEP_TOLERANCE)
        return res.x


def _rounded(values: dict[str, float], chosen: Sequence[Choice]) -> dict[str, float]:
    """Fitted values as written: SIGNIFICANT digits, on a bound when within STEP_TOLERANCE of its range of it
    (the least squares stops just inside its bounds)."""
    out = {}
    for c in chosen:
        v, near = values[c.path], STEP_TOLERANCE * (c.upper - c.lower)
        v = c.lower if v - c.lower <= near else c.upper if c.upper - v <= near else float(f"{v:.{SIGNIFICANT}g}")
        out[c.path] = min(max(v, c.lower), c.upper)
    return out


@dataclass
class TargetFit:
    """The fit of one measurement kind: parameters chosen and fitted, and each run's leave-one-out prediction."""

    target: str
    indices: list[int]
    selection: Selection
    values: dict[str, float]                 # fitted, rounded as written
    loo: dict[int, float] = field(default_factory=dict)   # run index -> prediction without that run in the fit
    loo_note: str = ""


def _fit(pred: Predictor, target: str, indices: list[int], sel: Selection, base: dict[str, float],
         near: dict[str, float] | None = None) -> tuple["_Problem", np.ndarray]:
    """The problem of the chosen parameters and its least-squares point from their starts, or from the values
    `near` gives (a leave-one-out fold starts at the full fit: the same optimum, in fewer steps)."""
    prob = _Problem(pred, target, sel.chosen, base)
    near = near or {}
    return prob, prob.solve(indices, np.array([near.get(c.path, c.start) for c in sel.chosen]) / prob.scale)


def _cost(prob: "_Problem", u: np.ndarray, indices: list[int]) -> float:
    return float(np.sum(prob.residuals(u, indices) ** 2))


def fit_target(pred: Predictor, target: str, indices: list[int], base: dict[str, float],
               only: set[str] | None = None, leave_one_out: bool = True,
               near: dict[str, float] | None = None, again_at: dict[str, float] | None = None,
               on_fold: Callable[[int, int], None] | None = None) -> TargetFit:
    """Choose, fit and cross-check the parameters of `target` on runs `indices` (others held at `base`). A
    leave-one-out fold starts its fits from the full fit's values (`near`) and makes its second choice at the full
    fit's first fitted point (`again_at`), next to its own, where the full fit's probes were already made.
    `on_fold(done, total)` follows the leave-one-out folds."""
    sel = choose(pred, target, indices, base, only)
    out = TargetFit(target, list(indices), sel, {})
    if not sel.chosen:
        return out
    prob, best = _fit(pred, target, indices, sel, base, near)
    first, first_point = sel, prob.values(best)
    # the choice again at the fitted point, where the probes see the runs as the fit does: its parameters,
    # fitted from the same start, replace the first ones when they fit the runs better
    try:
        again = choose(pred, target, indices, again_at or first_point, only)
    except InputError:       # too many parameters felt there for these runs: the first choice stands
        again = sel
    if {c.path for c in again.chosen} != {c.path for c in sel.chosen} and again.chosen:
        starts = {c.path: (c.start, c.lower, c.upper) for c in sel.chosen}
        again.chosen = [Choice(c.path, *starts.get(c.path, (c.start, c.lower, c.upper)), c.reason)
                        for c in again.chosen]
        prob2, best2 = _fit(pred, target, indices, again, base, near)
        if _cost(prob2, best2, indices) < _cost(prob, best, indices):
            sel, prob, best = again, prob2, best2
            out.selection = sel
    out.values = _rounded(prob.values(best), sel.chosen)
    if not leave_one_out:
        return out
    if len(indices) - 1 < len(sel.chosen):
        out.loo_note = (f"leave-one-out needs at least {len(sel.chosen) + 1} runs for {len(sel.chosen)} "
                        f"parameters")
        return out
    pick = 0 if target == STEP_TIME else 1
    known = ({c.path for c in first.chosen}, {c.path for c in sel.chosen})   # the full fit's choices
    for k, i in enumerate(indices):     # the choice made again without run i, then the fit of what it chose
        if on_fold is not None:
            on_fold(k, len(indices))
        rest = [j for j in indices if j != i]
        try:
            fold_first = choose(pred, target, rest, base, only)
        except InputError:   # without run i the runs cannot tell the parameters apart: no prediction
            out.loo_note = f"leave-one-out: without {pred.runs[i].label} the other runs fit no choice"
            out.loo = {}
            return out
        if {c.path for c in fold_first.chosen} in known:
            # a choice the full fit made: the same fit without run i, refitted from the full fit's point (whose
            # Jacobian rows it reuses)
            u = prob.solve(rest, best)
            out.loo[i] = float(prob.predicted(u, [i])[0])
        else:
            fold = fit_target(pred, target, rest, base, only, leave_one_out=False, near=prob.values(best),
                              again_at=first_point)
            out.loo[i] = float(pred.predict({**base, **fold.values}, [i])[pick][0])
    return out
