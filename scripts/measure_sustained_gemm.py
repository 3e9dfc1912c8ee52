"""Does a GPU keep its GEMM rate over a whole training step, or do power and clocks pull it below the short
bursts that `profile cluster` and the block timings measure? (scripts/gpu_check.sh, step 2d.)

Times one bf16 GEMM shape in a short burst (a few calls after warm-up, as the profiles do), then back to back
for `--seconds`, in windows: the rate of each window (TFLOP/s) shows whether and when it drops. The answer
decides whether the Hopper efficiencies of cluster_specs/ need a sustained-rate factor for whole steps (the
H200 curve's 16384^3 point runs at 679 TFLOP/s against 771 at 8192^3: throttling over a 13 ms kernel, or
the kernel's own choice).

    python scripts/measure_sustained_gemm.py --size 8192 --seconds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def rate_tflops(size: int, seconds: float) -> float:
    """FLOP/s of size^3 GEMMs done in `seconds`, in TFLOP/s (2 n^3 FLOP each)."""
    return 2.0 * size ** 3 / seconds / 1e12


def timed_calls(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    """Seconds per call of `calls` back-to-back a @ b on the current stream (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        torch.mm(a, b)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="GEMM dimension n of n x n x n (default 8192)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the back-to-back run (default 3)")
    ap.add_argument("--window", type=float, default=0.1, help="seconds per reported window (default 0.1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: measure_sustained_gemm.py needs a CUDA device", file=sys.stderr)
        return 2
    if args.size < 256 or args.seconds <= 0 or args.window <= 0:
        print("error: --size must be at least 256 and --seconds, --window positive", file=sys.stderr)
        return 2
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    timed_calls(a, b, 3)                                   # warm-up
    time.sleep(1.0)                                        # let clocks and power settle back
    burst = statistics.median(timed_calls(a, b, 1) for _ in range(5))
    print(f"burst: {rate_tflops(args.size, burst):.1f} TFLOP/s ({burst * 1e3:.3f} ms per GEMM, median of 5)")
    per_window = max(1, round(args.window / burst))
    rates, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        rates.append(rate_tflops(args.size, timed_calls(a, b, per_window)))
    print(f"back to back, {per_window} GEMMs per window of ~{args.window:g} s:")
    print("  " + " ".join(f"{r:.0f}" for r in rates))
    last = rates[len(rates) // 2:]
    print(f"first window {rates[0]:.1f}, median of the last half {statistics.median(last):.1f} TFLOP/s: "
          f"sustained / burst = {statistics.median(last) / rate_tflops(args.size, burst):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
