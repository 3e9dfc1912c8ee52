"""End-to-end wall time of `meshplan estimate --json` (process start to exit), median of 5 runs.

    python scripts/bench_estimate.py

Target: under 0.5 s per call. The package's modules are byte-compiled first (as `pip install` does for a
regular install, and `make setup` for this editable one), so the runs measure start-up, not compilation.
"""

from __future__ import annotations

import compileall
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["estimate", "--model", "llama3-70b", "--cluster", "dgx-h100", "--nodes", "8", "--global-batch", "256",
        "--seq", "8192", "--tp", "8", "--pp", "4", "--recompute", "selective", "--sp", "--json"]


def main(runs: int = 5) -> None:
    root = Path(__file__).resolve().parent.parent
    for package in ("planner", "profiler", "runtime"):
        compileall.compile_dir(root / package, quiet=1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "planner.cli", *ARGS], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    print(f"meshplan estimate --json: median {statistics.median(times):.3f} s over {runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
