"""The whole loop on the one cluster every machine has, as a user runs it on theirs: `meshplan profile cluster`
on this CPU (two gloo processes, one per core), `meshplan run` of a dozen layouts, their prediction with the
profiled spec, `meshplan calibrate` on them, and each run scored left out of the fit (what a user gets on their own
cluster after calibrating).

    python scripts/accuracy_cpu.py                       # 12 layouts, 12 steps each (~5 min on 2 cores)
    python scripts/accuracy_cpu.py --reports runs/       # keep the run reports (and the profile) in runs/; reuse them
    python scripts/accuracy_cpu.py --only 3              # the first 3 layouts (a quick look)

Every step goes through the command line: `profile cluster`, `estimate -o`, `run --report`, `calibrate`. The
measured step time is the report's median over the steps after the first. On CPU the runtime reports the
resident set (no allocator counters), so only times are calibrated here; `peak_reserved_bytes` of GPU runs
calibrates memory too. Two processes on two cores: more processes than cores time-share them, which no device
model describes (README, "Accuracy and speed").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MESHPLAN = [sys.executable, "-m", "planner.cli"]

# A 13M-parameter GPT: big enough that GEMMs, not per-op costs, take most of a CPU step.
GPT_SMALL = {"name": "gpt-small-cpu", "num_layers": 4, "hidden_size": 256, "num_heads": 4, "vocab_size": 2048,
             "max_position_embeddings": 256, "dropout": 0.0}

# (model, tp, pp, dp, mbs, zero, recompute, extra options): two ranks each, global batch 16, seq 256.
LAYOUTS = [
    ("gpt-tiny", 1, 1, 2, 2, 0, "none", []),
    ("gpt-small-cpu", 2, 1, 1, 2, 0, "none", []),
    ("llama-tiny", 1, 2, 1, 2, 0, "none", []),
    ("gpt-small-cpu", 1, 1, 2, 4, 3, "none", []),
    ("gpt-tiny", 2, 1, 1, 4, 0, "none", ["--sp"]),
    ("gpt-small-cpu", 1, 2, 1, 1, 0, "none", ["--schedule", "gpipe"]),
    ("llama-tiny", 1, 1, 2, 2, 2, "selective", []),
    ("gpt-small-cpu", 1, 1, 2, 2, 1, "full", []),
    ("llama-tiny", 2, 1, 1, 1, 0, "none", []),
    ("gpt-small-cpu", 2, 1, 1, 8, 0, "full", []),
    ("gpt-tiny", 1, 2, 1, 2, 0, "full", []),
    ("llama-tiny", 1, 1, 2, 8, 3, "none", []),
]
NPROC = 2


def sh(args: list[str], cwd: Path) -> str:
    """Run a meshplan command; its stdout, or exit with its stderr."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-2000:]}")
    return done.stdout


def layout_name(layout) -> str:
    model, tp, pp, dp, mbs, zero, rec, extra = layout
    return f"{model}-t{tp}p{pp}d{dp}-m{mbs}-z{zero}-{rec}" + "".join(e.strip("-") for e in extra)


def measure(layout, reports: Path, work: Path, cluster: Path, steps: int) -> Path:
    """The run report of one layout: measured now, or kept from an earlier call in `reports`."""
    report = reports / f"{layout_name(layout)}.json"
    if report.exists():
        return report
    model, tp, pp, dp, mbs, zero, rec, extra = layout
    model_arg = str(work / "gpt-small-cpu.yaml") if model == "gpt-small-cpu" else model
    plan = work / f"{layout_name(layout)}.plan.json"
    sh(MESHPLAN + ["estimate", "-m", model_arg, "-c", str(cluster), "-b", "16", "--seq", "256", "--tp", str(tp),
                   "--pp", str(pp), "--dp", str(dp), "--mbs", str(mbs), "--zero", str(zero), "--recompute", rec,
                   *extra, "-o", str(plan), "--force"], ROOT)
    sh(MESHPLAN + ["run", str(plan), "--steps", str(steps), "--report", str(report), "--force"], ROOT)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, help="directory for the run reports (kept; existing ones reused)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", type=int, default=len(LAYOUTS), help="measure the first N layouts")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="accuracy-cpu-"))
    reports = args.reports or work / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (work / "gpt-small-cpu.yaml").write_text(yaml.safe_dump(GPT_SMALL))

    cluster = reports / "cpu-profiled.yaml"
    if not cluster.exists():
        print(f"profiling this machine as {NPROC} gloo processes", flush=True)
        sh(MESHPLAN + ["profile", "cluster", "--nproc", str(NPROC), "--name", f"cpu-{NPROC}", "-o", str(cluster),
                       "--no-progress"], ROOT)
    files = []
    for i, layout in enumerate(LAYOUTS[:args.only]):
        print(f"[{i + 1}/{args.only}] {layout_name(layout)}", flush=True)
        files.append(measure(layout, reports, work, cluster, args.steps))

    calibrated = work / "cpu-calibrated.yaml"
    print(sh(MESHPLAN + ["calibrate", "-c", str(cluster), "--runs", *map(str, files), "-o", str(calibrated)], ROOT))
    record = yaml.safe_load(calibrated.read_text())["calibration"]
    print(f"step time over {len(files)} runs: profiled spec MAPE {record['error_before_pct']:.1f}%, "
          f"calibrated {record['error_after_pct']:.1f}% in sample, {record['loo_error_pct'] or float('nan'):.1f}% "
          f"with each run left out of the fit")


if __name__ == "__main__":
    main()
