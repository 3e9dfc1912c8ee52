"""Fit a cluster spec's physical parameters to measured step times (vTrain's table, `meshplan run` reports).

A parameter is named by its dotted path: `gpu.` for the cluster's GPU type (e.g.
`gpu.efficiency.gemm_max`), `engine.` for the engine's data as it behaves on this cluster (e.g.
`engine.host.per_kernel_s`, kept in the cluster's `engine_overrides` for that engine), anything else a path in
the cluster spec (`intra_node.latency`, `overlap_slowdown`). The fit minimises the squared log ratio of
predicted to measured step time over all runs (scipy's bounded least squares), so every run weighs the same
whatever its length.
"""

from __future__ import annotations

from typing import Callable, Sequence

from planner.engine import EngineSpec, engine_on
from planner.specs import ClusterSpec


def with_params(cluster: ClusterSpec, values: dict[str, float], engine: str = "meshplan") -> ClusterSpec:
    """A copy of `cluster` with the dotted-path parameters replaced (`engine.` ones for engine `engine`)."""
    data = cluster.model_dump()
    for path, value in values.items():
        parts = path.split(".")
        if parts[0] == "engine":
            data["engine_overrides"].setdefault(engine, {})[".".join(parts[1:])] = float(value)
            continue
        if parts[0] == "gpu":
            node, parts = data["gpu_types"][cluster.nodes.gpu_type], parts[1:]
        else:
            node = data          # a path in the cluster spec itself (`overlap_slowdown`, `intra_node.latency`)
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(path)
        node[parts[-1]] = value
    return ClusterSpec.model_validate(data)


def get_param(cluster: ClusterSpec, path: str, engine: EngineSpec | None = None) -> float:
    """The current value of a dotted-path parameter (`engine.` ones as `engine` behaves on `cluster`)."""
    parts = path.split(".")
    if parts[0] == "engine":
        if engine is None:
            raise KeyError(path)
        node = engine_on(engine, cluster)
        parts = parts[1:]
    else:
        node = cluster.gpu if parts[0] == "gpu" else getattr(cluster, parts[0])
        parts = parts[1:]
    for p in parts:
        node = getattr(node, p)
    return float(node)


def fit(cluster: ClusterSpec, params: Sequence[tuple[str, float, float]], measured: Sequence[float],
        predict: Callable[[ClusterSpec], Sequence[float]], engine: EngineSpec | None = None) -> dict[str, float]:
    """Values of `params` ((path, lower, upper) each) that best match `measured` step times (seconds) with
    `predict(cluster) -> step times`, starting from the current values."""
    import numpy as np
    from scipy.optimize import least_squares

    name = engine.name if engine is not None else "meshplan"
    meas = np.asarray(measured, dtype=float)
    x0 = np.array([get_param(cluster, p, engine) for p, _, _ in params])
    scale = np.where(x0 > 0, x0, 1.0)

    def residuals(x):
        c = with_params(cluster, {p: v for (p, _, _), v in zip(params, x * scale)}, name)
        return np.log(np.asarray(predict(c), dtype=float) / meas)

    lo = np.array([b[1] for b in params]) / scale
    hi = np.array([b[2] for b in params]) / scale
    start = np.clip(np.ones(len(params)), lo, hi)
    res = least_squares(residuals, start, bounds=(lo, hi), diff_step=1e-3)
    return {p: float(v * scale_) for (p, _, _), v, scale_ in zip(params, res.x, scale)}
