"""Fit a cluster spec's efficiency parameters to measured step times (vTrain's table, `meshplan run` reports).

A parameter is named by its dotted path in the cluster spec, with `gpu.` standing for the cluster's GPU type
(e.g. `gpu.efficiency.kernel_overhead_s`, `intra_node.latency`). The fit minimises the squared log ratio of
predicted to measured step time over all runs (scipy's bounded least squares), so every run weighs the same
whatever its length.
"""

from __future__ import annotations

from typing import Callable, Sequence

from planner.specs import ClusterSpec


def with_params(cluster: ClusterSpec, values: dict[str, float]) -> ClusterSpec:
    """A copy of `cluster` with the dotted-path parameters replaced."""
    data = cluster.model_dump()
    for path, value in values.items():
        parts = path.split(".")
        node = data["gpu_types"][cluster.nodes.gpu_type] if parts[0] == "gpu" else data[parts[0]]
        for p in parts[1:-1]:
            node = node[p]
        node[parts[-1]] = value
    return ClusterSpec.model_validate(data)


def get_param(cluster: ClusterSpec, path: str) -> float:
    parts = path.split(".")
    node = cluster.gpu if parts[0] == "gpu" else getattr(cluster, parts[0])
    for p in parts[1:]:
        node = getattr(node, p)
    return float(node)


def fit(cluster: ClusterSpec, params: Sequence[tuple[str, float, float]], measured: Sequence[float],
        predict: Callable[[ClusterSpec], Sequence[float]]) -> dict[str, float]:
    """Values of `params` ((path, lower, upper) each) that best match `measured` step times (seconds) with
    `predict(cluster) -> step times`, starting from the cluster's current values."""
    import numpy as np
    from scipy.optimize import least_squares

    meas = np.asarray(measured, dtype=float)
    x0 = np.array([get_param(cluster, p) for p, _, _ in params])
    scale = np.where(x0 > 0, x0, 1.0)

    def residuals(x):
        c = with_params(cluster, {p: v for (p, _, _), v in zip(params, x * scale)})
        return np.log(np.asarray(predict(c), dtype=float) / meas)

    lo = np.array([b[1] for b in params]) / scale
    hi = np.array([b[2] for b in params]) / scale
    start = np.clip(np.ones(len(params)), lo, hi)
    res = least_squares(residuals, start, bounds=(lo, hi), diff_step=1e-3)
    return {p: float(v) for (p, _, _), v in zip(params, res.x * scale)}
