"""Fit a cluster spec's efficiency parameters to `meshplan run` reports, and show predicted vs measured.

    python scripts/calibrate_runs.py --cluster cpu-local run_*.json
    python scripts/calibrate_runs.py --cluster cpu-local --fit gpu.efficiency.kernel_overhead_s:1e-6:0.01 run_*.json

Each report carries its plan (model, training, configuration, layout); the prediction is recomputed with
--cluster (resized to the plan's nodes and GPUs per node). With --fit PATH:LOW:HIGH (repeatable) the named
parameters are refitted by least squares on log(predicted / measured) and printed; paste them into the
cluster file. Without --fit it only reports the errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.calibrate import fit, with_params  # noqa: E402
from planner.cost.model import CostModel  # noqa: E402
from planner.layout import DEFAULT_ORDER  # noqa: E402
from planner.loaders import load_cluster  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.specs import ClusterSpec, ParallelConfig  # noqa: E402


def load_runs(paths: list[str]) -> list[tuple[str, Plan, float]]:
    runs = []
    for p in paths:
        report = json.loads(Path(p).read_text())
        plan = Plan.model_validate(report["plan"])
        runs.append((Path(p).stem, plan, float(report["measured"]["step_time_s"])))
    return runs


def predict(runs, cluster: ClusterSpec) -> list[float]:
    out = []
    for _, plan, _ in runs:
        c = cluster.resized(plan.cluster.num_nodes, plan.cluster.gpus_per_node)
        cfg = ParallelConfig(**{k: getattr(plan.config, k) for k in ParallelConfig.model_fields})
        order = tuple(plan.config.layout) if plan.config.layout else DEFAULT_ORDER
        out.append(CostModel(plan.model, c, plan.training).evaluate(cfg, order).predicted.step_time_s)
    return out


def table(runs, predicted: list[float]) -> None:
    errors = []
    print(f"{'run':<28}{'measured ms':>12}{'predicted ms':>14}{'error':>9}")
    for (name, _, meas), pred in zip(runs, predicted):
        errors.append(abs(pred / meas - 1))
        print(f"{name:<28}{meas * 1e3:>12.1f}{pred * 1e3:>14.1f}{pred / meas - 1:>+9.1%}")
    print(f"mean absolute error {statistics.mean(errors):.1%}, median {statistics.median(errors):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="run reports written by `meshplan run --report`")
    ap.add_argument("--cluster", required=True, help="built-in cluster name or cluster file")
    ap.add_argument("--fit", action="append", default=[], metavar="PATH:LOW:HIGH",
                    help="a parameter to refit, e.g. gpu.efficiency.kernel_overhead_s:1e-6:0.01")
    args = ap.parse_args()
    runs = load_runs(args.reports)
    cluster = load_cluster(args.cluster)
    print(f"with {cluster.name} as it is:")
    table(runs, predict(runs, cluster))
    if args.fit:
        params = [(path, float(lo), float(hi)) for path, lo, hi in (f.rsplit(":", 2) for f in args.fit)]
        values = fit(cluster, params, [m for _, _, m in runs], lambda c: predict(runs, c))
        print("\nfitted:")
        for path, value in values.items():
            print(f"  {path} = {value:.6g}")
        table(runs, predict(runs, with_params(cluster, values)))


if __name__ == "__main__":
    main()
