"""Benchmark: wall time of `meshplan profile cluster --nproc N` (default 8 gloo processes on this machine),
end to end as a user runs it (process start-up, torch imports, every measurement, the fit, the file).

    .venv/bin/python scripts/bench_profile_cluster.py [--nproc 8] [--runs 3] [--budget 60]

Prints each run's wall time with the measurement time and the slowest steps (from the raw file), then the
median, and exits 1 when the median is over the budget (seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(nproc: int, workdir: Path, index: int) -> tuple[float, dict]:
    out = workdir / f"cluster-{index}.json"
    raw = workdir / f"raw-{index}.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "planner.cli", "profile", "cluster", "--nproc", str(nproc), "-o", str(out),
                        "--raw", str(raw), "--no-progress", "--force"], cwd=REPO, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"run {index} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return wall, json.loads(raw.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="Seconds the median may take.")
    args = ap.parse_args()
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            wall, raw = one_run(args.nproc, Path(tmp), i)
            walls.append(wall)
            steps = raw.get("step_s", {})
            slowest = sorted(steps.items(), key=lambda kv: -kv[1])[:3]
            print(f"run {i + 1}: {wall:5.1f} s wall, {raw.get('elapsed_s', 0):5.1f} s measuring "
                  f"({len(steps)} steps; slowest: {', '.join(f'{k} {v:.1f} s' for k, v in slowest)})", flush=True)
    med = statistics.median(walls)
    print(f"profile cluster, {args.nproc} gloo processes: median {med:.1f} s over {args.runs} runs "
          f"(min {min(walls):.1f}, max {max(walls):.1f}); budget {args.budget:.0f} s: "
          f"{'ok' if med <= args.budget else 'OVER'}")
    sys.exit(0 if med <= args.budget else 1)


if __name__ == "__main__":
    main()
