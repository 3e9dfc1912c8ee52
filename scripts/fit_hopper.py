"""Fit the Hopper efficiencies of cluster_specs/hgx-h200.yaml (and dgx-h100.yaml) and meshplan's eager host
costs to our own H200 measurements in ../shared/reference/:

  1. h200_device_profile.csv, bf16 GEMMs at 10 shapes, each timed alone with CUDA events: t = FLOPs /
     (peak * gemm_max * prod(x / (x + gemm_tile))) + t_call, where t_call is the host's time to issue one
     call into an idle stream (it shows up in a lone call's event time) -> gemm_max, gemm_tile;
     the device-to-device copy -> `memory` (bytes read and written over the HBM spec);
  2. h200_gpt_layer_times.csv, one GPT-2 block's forward and backward in eager PyTorch (pure bf16, SDPA flash,
     no dropout) at h 1024-12288, seq 2048-8192, tp 1-8 shard shapes: the meshplan engine's kernels
     (planner/cost/kernels.py, what runtime/models.py runs) with the GEMM curve of step 1 held fixed
     -> flash_attention, and the host seconds per forward and per backward kernel (the small blocks are
     launch-bound). Each pass is timed alone from an idle device, so it is priced as one (kernels.py's
     isolated_pass_time: the launch queue filling from empty), not as the steady state of many passes.

    python scripts/fit_hopper.py          # prints the fitted values, the per-row errors and a leave-one-out MAPE

The values go into the YAML files with this script named as their source.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.cost.kernels import Dtypes, KernelOptions, block_work, isolated_pass_time  # noqa: E402
from planner.engine import load_engine, with_overrides  # noqa: E402
from planner.loaders import load_cluster  # noqa: E402
from planner.specs import ModelSpec  # noqa: E402

REFERENCE = next(p for p in (ROOT.parent / "shared" / "reference", ROOT / "tests" / "data" / "reference")
                 if (p / "h200_gpt_layer_times.csv").is_file())
PEAK = 989e12
SPEC_HBM = 4.8e12
DEVICE_FLOOR_S = 3e-6    # shortest kernel on Hopper (launch to completion of an empty kernel, ~2-4 us), not fitted


def rows(name: str) -> list[dict[str, str]]:
    with open(REFERENCE / name) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def fit_gemm() -> tuple[dict[str, float], list[tuple[str, float]]]:
    """(gemm_max, gemm_tile, t_call) by least squares on log time over the measured GEMM shapes."""
    gemms = [r for r in rows("h200_device_profile.csv") if r["kind"] == "matmul"]
    shapes = [(int(r["m"]), int(r["n"]), int(r["k"]), float(r["ms"]) * 1e-3) for r in gemms]

    def time(x, m, n, k):
        e, tile, call = x
        eff = e * (m / (m + tile)) * (n / (n + tile)) * (k / (k + tile))
        return 2.0 * m * n * k / (PEAK * eff) + call * 1e-6

    res = least_squares(lambda x: [np.log(time(x, m, n, k) / t) for m, n, k, t in shapes], [0.8, 100, 10],
                        bounds=([0.3, 0, 0], [1, 5000, 100]))
    errors = [(f"{m}x{n}x{k}", 100 * (time(res.x, m, n, k) / t - 1)) for m, n, k, t in shapes]
    return {"gemm_max": res.x[0], "gemm_tile": res.x[1], "t_call_us": res.x[2]}, errors


def copy_efficiency() -> float:
    r = next(r for r in rows("h200_device_profile.csv") if r["kind"] == "d2d_copy")
    return float(r["gb_per_s"]) * 1e9 / SPEC_HBM


def block_rows() -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items()} for r in rows("h200_gpt_layer_times.csv")]


def gpt_block(r: dict[str, float]) -> ModelSpec:
    h = int(r["hidden"])
    return ModelSpec(num_layers=1, hidden_size=h, num_heads=int(r["heads"]), vocab_size=50304,
                     max_position_embeddings=int(r["seq"]), dropout=0.0, attention_kernel="flash")


def predict_blocks(data, gpu, engine) -> np.ndarray:
    """[forward_s, backward_s] per row, as the meshplan engine runs the block at the row's shard shapes."""
    opts, (hf, hb) = KernelOptions.of(engine), engine.host_per_kernel
    dt = Dtypes.of("bf16")
    out = []
    for r in data:
        w = block_work(gpt_block(r), int(r["mbs"]), int(r["seq"]), int(r["tp"]), False, "none", dt, opts)
        out.append((isolated_pass_time(w.forward, gpu, "bf16", hf), isolated_pass_time(w.backward, gpu, "bf16", hb)))
    return np.array(out)


BLOCK_FIT = [("gpu.efficiency.flash_attention", 0.2, 0.9), ("gpu.efficiency.attention_tile", 0.0, 20000.0),
             ("gpu.efficiency.gemm_backward", 0.5, 1.0),
             ("engine.host.per_kernel_s", 1e-6, 100e-6), ("engine.host.per_backward_kernel_s", 1e-6, 100e-6)]


def apply(gpu, engine, values: dict[str, float]):
    eff = {k.split(".")[-1]: v for k, v in values.items() if k.startswith("gpu.")}
    gpu = gpu.model_copy(update={"efficiency": gpu.efficiency.model_copy(update=eff)})
    engine = with_overrides(engine, {k.removeprefix("engine."): v for k, v in values.items()
                                     if k.startswith("engine.")})
    return gpu, engine


def fit_blocks(data, gpu, engine) -> dict[str, float]:
    meas = np.array([(r["fwd_ms"], r["bwd_ms"]) for r in data]) * 1e-3
    x0 = np.array([0.5, 50.0, 0.9, 15e-6, 25e-6])
    lo, hi = np.array([b[1] for b in BLOCK_FIT]), np.array([b[2] for b in BLOCK_FIT])

    def resid(x):
        g, e = apply(gpu, engine, {p: v * s for (p, _, _), v, s in zip(BLOCK_FIT, x, x0)})
        return np.log(predict_blocks(data, g, e) / meas).ravel()

    res = least_squares(resid, np.ones(len(x0)), bounds=(lo / x0, hi / x0), diff_step=1e-3)
    return {p: float(v * s) for (p, _, _), v, s in zip(BLOCK_FIT, res.x, x0)}


def main() -> None:
    gemm, gemm_errors = fit_gemm()
    print("1. GEMM curve (h200_device_profile.csv), t = FLOPs/(peak*gemm_max*prod(x/(x+tile))) + t_call:")
    print(f"   gemm_max {gemm['gemm_max']:.3f}, gemm_tile {gemm['gemm_tile']:.1f}, t_call {gemm['t_call_us']:.1f} us")
    print("   per shape error %: " + ", ".join(f"{s} {e:+.1f}" for s, e in gemm_errors))
    mem = copy_efficiency()
    print(f"   memory (d2d copy / HBM spec) {mem:.3f}")

    cluster = load_cluster("hgx-h200")
    gpu = cluster.gpu.model_copy(update={"efficiency": cluster.gpu.efficiency.model_copy(update={
        "gemm_max": gemm["gemm_max"], "gemm_tile": gemm["gemm_tile"], "memory": mem,
        "kernel_overhead_s": DEVICE_FLOOR_S})})
    engine = load_engine("meshplan")
    data = block_rows()
    values = fit_blocks(data, gpu, engine)
    print("2. eager GPT blocks (h200_gpt_layer_times.csv), meshplan engine kernels:")
    for p, v in values.items():
        print(f"   {p} = {v:.4g}")
    g, e = apply(gpu, engine, values)
    pred = predict_blocks(data, g, e)
    meas = np.array([(r["fwd_ms"], r["bwd_ms"]) for r in data]) * 1e-3
    err = 100 * (pred / meas - 1)
    print(f"   rows {len(data)}: forward MAPE {np.abs(err[:, 0]).mean():.1f}% (max {np.abs(err[:, 0]).max():.1f}), "
          f"backward MAPE {np.abs(err[:, 1]).mean():.1f}% (max {np.abs(err[:, 1]).max():.1f})")
    loo = []
    for i in range(len(data)):
        rest = data[:i] + data[i + 1:]
        gi, ei = apply(gpu, engine, fit_blocks(rest, gpu, engine))
        loo.append(np.abs(predict_blocks([data[i]], gi, ei)[0] / meas[i] - 1) * 100)
    loo = np.array(loo)
    print(f"   leave-one-out MAPE: forward {loo[:, 0].mean():.1f}%, backward {loo[:, 1].mean():.1f}%")
    print("   h   heads seq  mbs tp  fwd ms meas/pred     bwd ms meas/pred")
    for r, p in zip(data, pred * 1e3):
        print(f"   {int(r['hidden']):<5} {int(r['heads']):<3} {int(r['seq']):<5} {int(r['mbs']):<2} {int(r['tp']):<2} "
              f"{r['fwd_ms']:8.3f} {p[0]:8.3f}   {r['bwd_ms']:8.3f} {p[1]:8.3f}")


if __name__ == "__main__":
    main()
