"""Fit the A100 efficiencies of cluster_specs/dgx-a100-80gb.yaml (and dgx-a100-40gb.yaml) and DeepSpeed's host
costs to the three A100 sets of ../shared/reference/ at once, each predicted with the engine that ran it:

  vtrain        1,440 Megatron-DeepSpeed iterations on 2-8 A100s (deepspeed engine): small, launch-bound
                models, which pin the host costs and the GEMM shape penalty;
  korthikanti   Table 5, 22B-1T GPTs on 8-512 A100s (megatron engine, 2022);
  sc21-ptdp     the PTD-P rows of Megatron SC21 Table 2 (megatron engine, 2021): large GEMMs, which pin
                the GEMM asymptote. Its ZeRO-3 rows are left out: they pin DeepSpeed's ZeRO-3 engine data
                (overlap.gather_window, dp_rails in cluster_specs/engines/deepspeed.yaml), not the device.

One GPU, so one set of device efficiencies (`gemm_max`, `gemm_tile`, `memory`) and one NVLink latency for all
three; the host costs per kernel are DeepSpeed's (the other sets' models are too large to see them). The fit
minimises squared log(predicted / measured), each set weighed as a whole (vTrain 3 times: it has the most
configurations), over every 4th vTrain row; the figures printed are over every row. `memory` stops at its
physical bound (0.95 of the HBM spec).

    python scripts/fit_a100.py        # about a minute; prints the fitted values and each set's error
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_public as sets  # noqa: E402
from planner.calibrate import with_params  # noqa: E402

PARAMS = [  # (dotted path, start, lower, upper, scale); "engine." paths are DeepSpeed's
    ("gpu.efficiency.gemm_max", 0.910, 0.5, 0.95, 1.0),
    ("gpu.efficiency.gemm_tile", 204.0, 0.0, 512.0, 100.0),
    ("gpu.efficiency.memory", 0.95, 0.3, 0.95, 1.0),
    ("engine.host.per_kernel_s", 75.5e-6, 1e-6, 200e-6, 1e-4),
    ("engine.host.per_backward_kernel_s", 25.2e-6, 1e-6, 200e-6, 1e-4),
    ("intra_node.latency", 4.05e-6, 1e-6, 60e-6, 1e-5),
    ("engine.host.per_microbatch_s", 2.0e-3, 1e-5, 10e-3, 1e-3),
    ("engine.host.per_step_s", 1e-5, 1e-5, 50e-3, 1e-2),
]
VTRAIN_WEIGHT = 3.0


def main() -> None:
    vt, ko, ptdp = sets.vtrain_set(), sets.korthikanti_set(), sets.sc21_ptdp_set().cases
    scale = np.array([p[4] for p in PARAMS])

    def clusters(x: np.ndarray):
        values = {p[0]: v for p, v in zip(PARAMS, x * scale)}
        device = {k: v for k, v in values.items() if not k.startswith("engine.")}
        return with_params(vt.cluster, values, "deepspeed"), with_params(ko.cluster, device, "megatron")

    def groups(x: np.ndarray, vtrain_rows: list):
        deepspeed, megatron = clusters(x)
        return [("vtrain", vtrain_rows, deepspeed, VTRAIN_WEIGHT), ("korthikanti", ko.cases, megatron, 1.0),
                ("sc21 PTD-P", ptdp, megatron, 1.0)]

    def residuals(x: np.ndarray) -> np.ndarray:
        out = []
        for _, cases, cluster, weight in groups(x, vt.cases[::4]):
            measured = np.array([c.measured_s for c in cases])
            out.append(weight * np.log(sets.predict(cases, cluster) / measured) / np.sqrt(len(cases)))
        return np.concatenate(out)

    def report(title: str, x: np.ndarray) -> None:
        print(title)
        for (path, *_), v in zip(PARAMS, x * scale):
            print(f"  {path:<36} {v:.4g}")
        for name, cases, cluster, _ in groups(x, vt.cases):
            err = sets.predict(cases, cluster) / np.array([c.measured_s for c in cases]) - 1
            print(f"  {name:<12} rows {len(cases):>5}  MAPE {np.mean(np.abs(err)) * 100:5.2f}%  "
                  f"signed {np.mean(err) * 100:+6.2f}%")

    x0 = np.array([p[1] for p in PARAMS]) / scale
    report("before", x0)
    fit = least_squares(residuals, x0, bounds=(np.array([p[2] for p in PARAMS]) / scale,
                                               np.array([p[3] for p in PARAMS]) / scale), diff_step=1e-3)
    report("after", fit.x)


if __name__ == "__main__":
    main()
