"""Measured per-layer costs (a `meshplan profile model` file) in place of the analytical ones.

A measurement is used as a correction of the analytical number at the same point: factor = measured /
analytical, both of one pass timed alone from an idle device (`kernels.isolated_time`), the factor then
scaling the steady-state pass of the step. At a (tp, micro-batch) that was not measured, the factor is
interpolated over the measured points of the same kind of block (dense or mixture of experts) and recompute
mode (inverse-distance weights in log2 tp and log2 micro-batch, exact at measured points) and multiplies the
analytical value there, so shapes between and beyond the measured ones keep the analytical model's scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost.kernels import MEGATRON, Dtypes, KernelOptions, block_work, embedding_work, head_work, isolated_time
from planner.cost.memory import block_activation_bytes, embedding_activation_bytes, head_activation_bytes
from planner.profile_data import ModelProfile
from planner.specs import GPUSpec, ModelSpec, TrainingSpec


@dataclass(frozen=True)
class Factors:
    forward: float
    backward: float          # backward including recomputation
    activations: float
    measured_at: str         # "measured" or "interpolated from tp 2 mbs 1, tp 4 mbs 1"


def _interpolate(points: list[tuple[int, int, tuple[float, float, float]]], tp: int, mbs: int) -> tuple[tuple, str]:
    """Inverse-distance (power 2) weighting in (log2 tp, log2 mbs); exact at a measured point."""
    weights, values, names = [], [], []
    for ptp, pmbs, value in points:
        d2 = (math.log2(ptp / tp)) ** 2 + (math.log2(pmbs / mbs)) ** 2
        if d2 == 0:
            return value, "measured"
        weights.append(1 / d2)
        values.append(value)
        names.append(f"tp {ptp} mbs {pmbs}")
    total = sum(weights)
    blended = tuple(sum(w * v[i] for w, v in zip(weights, values)) / total for i in range(3))
    return blended, "interpolated from " + ", ".join(names)


class MeasuredCosts:
    """Correction factors for blocks, embedding and head from one profile, for one model and training."""

    def __init__(self, profile: ModelProfile, model: ModelSpec, training: TrainingSpec, gpu: GPUSpec,
                 backend: str, opts: KernelOptions = MEGATRON, host_fwd: float = 0.0, host_bwd: float = 0.0,
                 host_replay: float | None = None):
        self.profile = profile
        self.mismatch = self._mismatch(profile, model, training, gpu, backend)
        self._blocks: dict[str, list] = {}
        self._ends: dict[str, list] = {}
        if self.mismatch:
            return
        dt = Dtypes.of(profile.run_precision or profile.precision)   # what the profiled blocks computed in
        seq = training.seq_len

        def timed(*segments) -> float:
            # the profiler times each pass alone, from a synchronised device (profiler/layers.py `_timed`)
            return isolated_time(list(segments), gpu, dt.matmul, opts.gemm_scale)
        for b in profile.blocks:
            moe = b.layer == "moe"
            w = block_work(model, b.mbs, seq, b.tp, False, b.recompute, dt, opts, moe_layer=moe)
            fwd = timed((w.forward, host_fwd))
            bwd = timed((w.recompute, host_fwd if host_replay is None else host_replay), (w.backward, host_bwd))
            act = block_activation_bytes(model, b.mbs, seq, b.tp, False, b.recompute, dt, opts, moe_layer=moe)
            self._blocks.setdefault((b.layer, b.recompute), []).append(
                (b.tp, b.mbs, (b.forward_s / fwd, b.backward_s / bwd, b.activation_bytes / act if act else 1.0)))
        for e in profile.ends:
            work = (embedding_work(model, e.mbs, seq, e.tp, False, dt) if e.part == "embedding"
                    else head_work(model, e.mbs, seq, e.tp, False, dt, opts))
            act = (embedding_activation_bytes(model, e.mbs, seq, e.tp, False) if e.part == "embedding"
                   else head_activation_bytes(model, e.mbs, seq, e.tp, False, dt, opts))
            self._ends.setdefault(e.part, []).append(
                (e.tp, e.mbs, (e.forward_s / timed((work[0], host_fwd)),
                               e.backward_s / timed((work[1], host_bwd)), e.activation_bytes / act)))

    @staticmethod
    def _mismatch(profile: ModelProfile, model: ModelSpec, training: TrainingSpec, gpu: GPUSpec, backend: str) -> str:
        device = profile.device
        if (device.type == "cuda") != (backend == "nccl"):
            return f"profiled on {device.type} ({device.name}), the cluster runs {backend}"
        if device.type == "cuda" and device.name.lower() != gpu.name.lower():
            return f"profiled on {device.name}, the cluster has {gpu.name}"
        ours = model.model_dump(exclude={"name"}) | {"attention_kernel": model.attention}
        theirs = profile.model.model_dump(exclude={"name"}) | {"attention_kernel": profile.model.attention}
        if ours != theirs:
            diff = sorted(k for k in ours if ours[k] != theirs.get(k))
            return f"profile is of another model ({', '.join(diff)} differ)"
        if profile.precision != training.precision:
            return f"profile precision {profile.precision} != {training.precision}"
        if profile.seq_len != training.seq_len:
            return f"profile sequence {profile.seq_len} != {training.seq_len}"
        return ""

    def block(self, tp: int, mbs: int, recompute: str, moe: bool = False) -> Factors | None:
        """The factors of a dense block (`moe` False) or a mixture-of-experts block: from the measurements of the
        same kind of block (None when the profile has none)."""
        layer = "moe" if moe else "dense"
        points = self._blocks.get((layer, recompute)) or self._blocks.get((layer, "none"))
        if not points:
            return None
        (f, b, a), where = _interpolate(points, tp, mbs)
        if (layer, recompute) not in self._blocks:
            where = f"{where} (recompute none)"
        return Factors(f, b, a, where)

    def end(self, part: str, tp: int, mbs: int) -> Factors | None:
        points = self._ends.get(part)
        if not points:
            return None
        (f, b, a), where = _interpolate(points, tp, mbs)
        return Factors(f, b, a, where)

    @property
    def optimizer_s_per_param(self) -> float | None:
        return self.profile.optimizer_s_per_param
