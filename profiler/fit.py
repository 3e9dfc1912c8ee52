"""Fits from raw measurements to the parameters the cost model uses (numpy and scipy only, no torch).

* `fit_alpha_beta`: a link's latency (s) and bandwidth (bytes/s) from round-trip times at several sizes.
* `fit_gemm`: the achievable GEMM rate A (FLOP/s) and tile (elements) of `planner.cost.kernels`:
  a GEMM (M, N, K) runs at A * prod(x / (x + tile)).
* `bus_bandwidth`: nccl-tests' bus bandwidth of a collective from its time.
* `overlap_slowdown`: the fraction of overlapped communication time lost to compute slow-down, as
  `planner.cost.dp_comm.exposed` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlphaBeta:
    latency_s: float        # one-way latency alpha, seconds
    bandwidth: float        # one-way bandwidth beta, bytes/s


def fit_alpha_beta(sizes: list[float], round_trip_s: list[float], ack_fraction: float = 0.5) -> AlphaBeta:
    """Latency and bandwidth of one direction of a link from send-then-acknowledge round trips.

    `round_trip_s[i]` is the time to send `sizes[i]` bytes and receive a tiny acknowledgement:
    T(M) = c + M / beta with c = alpha (the message) + alpha (the acknowledgement), so alpha =
    `ack_fraction` * c. The fit is non-negative least squares on relative error (weights 1/T, so the small
    sizes that set alpha count as much as the large ones that set beta). When noise leaves no positive
    slope, beta falls back to the largest size over its whole time (a lower bound on the bandwidth).
    """
    from scipy.optimize import nnls

    m = np.asarray(sizes, dtype=float)
    t = np.asarray(round_trip_s, dtype=float)
    if m.size < 2 or m.size != t.size or np.any(t <= 0):
        raise ValueError("fit_alpha_beta needs at least two sizes and a positive time per size")
    w = 1.0 / t
    design = np.stack([np.ones_like(m), m], axis=1) * w[:, None]
    (c, slope), _ = nnls(design, t * w)
    big = int(np.argmax(m))
    if slope <= 0 or not np.isfinite(slope):
        slope = t[big] / m[big]
        c = min(c, float(t.min()))
    return AlphaBeta(latency_s=float(ack_fraction * c), bandwidth=float(1.0 / slope))


def consistent(sizes: list[float], times_s: list[float], slack: float = 0.8) -> bool:
    """True when times grow with size (each at least `slack` times the one before): a measurement that
    breaks this was disturbed by the host and is worth repeating."""
    order = np.argsort(sizes)
    t = np.asarray(times_s, dtype=float)[order]
    return bool(np.all(t[1:] >= slack * t[:-1]))


@dataclass(frozen=True)
class GemmFit:
    rate: float            # asymptotic FLOP/s of a very large GEMM (A)
    tile: float            # elements: a dimension x is used at x / (x + tile)
    rms_log_error: float   # root-mean-square of log(predicted / measured) time over the points used
    points: int            # measurements the fit used (overhead-bound ones excluded)


def fit_gemm(shapes: list[tuple[int, int, int]], times_s: list[float], overhead_s: float = 0.0) -> GemmFit:
    """Fit time(M, N, K) = 2MNK / (A * prod(x / (x + tile))) to measured GEMM times (seconds).

    Points within 3x of the per-kernel overhead are dropped (the cost model floors them at the overhead
    anyway); the fit minimises squared log error, so every shape counts alike.
    """
    from scipy.optimize import least_squares

    shp = np.asarray(shapes, dtype=float)
    t = np.asarray(times_s, dtype=float)
    keep = t > 3.0 * overhead_s
    if keep.sum() < 2:
        keep = np.ones_like(t, dtype=bool)
    shp, t = shp[keep], t[keep]
    flops = 2.0 * shp.prod(axis=1)
    rates = flops / t

    def residual(p):
        log_a, tile = p
        eff = np.prod(shp / (shp + tile), axis=1)
        return np.log(flops / (np.exp(log_a) * eff)) - np.log(t)

    start = [np.log(rates.max() * 1.2), float(np.median(shp)) * 0.1]
    sol = least_squares(residual, start, bounds=([np.log(rates.max()) - 5, 0.0],
                                                 [np.log(rates.max()) + 5, float(shp.max()) * 10]))
    rms = float(np.sqrt(np.mean(sol.fun ** 2)))
    return GemmFit(rate=float(np.exp(sol.x[0])), tile=float(sol.x[1]), rms_log_error=rms, points=int(keep.sum()))


BUS_FACTOR = {"all_reduce": lambda n: 2.0 * (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def bus_bandwidth(op: str, group_size: int, message_bytes: float, time_s: float) -> float:
    """nccl-tests bus bandwidth (bytes/s): algorithm bandwidth M/t times 2(n-1)/n for all-reduce and
    (n-1)/n for all-gather / reduce-scatter, M being the full (unsharded) buffer."""
    return message_bytes / time_s * BUS_FACTOR[op](group_size)


def overlap_slowdown(compute_s: float, comm_s: float, both_s: float) -> float:
    """kappa in exposed = max(0, comm - compute) + kappa * min(comm, compute), from the times of the
    compute alone, the communication alone and both started together; clamped to [0, 1]."""
    shorter = min(compute_s, comm_s)
    if shorter <= 0:
        return 0.0
    kappa = (both_s - max(compute_s, comm_s)) / shorter
    return float(min(1.0, max(0.0, kappa)))

