"""Accuracy of meshplan's step-time predictions against 1,440 measured Megatron-DeepSpeed iterations.

Data: ../shared/reference/vtrain_single_node_a100.csv (vTrain, MICRO 2024): one node of 2, 4 or 8 A100s,
GPT models (h 1024/2048, 16 heads, 12-24 layers, seq 1024, vocab 51,200), fp16, full activation
recomputation, 1F1B, eager (non-flash) attention with dropout, ZeRO off.

    python scripts/accuracy_vtrain.py            # MAPE and Spearman per GPU count with cluster_specs/dgx-a100-80gb.yaml
    python scripts/accuracy_vtrain.py --fit      # refit the cluster file's efficiency parameters (prints them)

The fit adjusts only the physically meaningful parameters listed in FITTED, once, for all rows. The data is
read from ../shared/reference, or from its copy in tests/data/reference.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.calibrate import fit, with_params  # noqa: E402
from planner.cost.model import CostModel  # noqa: E402
from planner.engine import load_engine  # noqa: E402
from planner.loaders import load_cluster  # noqa: E402
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec  # noqa: E402

DATA = next((p for p in (ROOT.parent / "shared" / "reference" / "vtrain_single_node_a100.csv",
                          ROOT / "tests" / "data" / "reference" / "vtrain_single_node_a100.csv") if p.is_file()))
CLUSTER = "dgx-a100-80gb"
ENGINE = load_engine("deepspeed")      # Megatron-DeepSpeed: vTrain's runs
GPUS_PER_NODE = 8          # vTrain's A100 nodes

# (dotted path, lower bound, upper bound): `gpu.` the A100's efficiencies, `engine.` DeepSpeed's host costs
FITTED = [
    ("gpu.efficiency.gemm_max", 0.4, 0.95),
    ("gpu.efficiency.gemm_tile", 0.0, 512.0),
    ("gpu.efficiency.memory", 0.3, 0.95),
    ("engine.host.per_kernel_s", 1e-6, 200e-6),
    ("engine.host.per_backward_kernel_s", 1e-6, 200e-6),
    ("intra_node.latency", 1e-6, 60e-6),
]


def read_rows(path: Path = DATA) -> list[dict[str, int | float]]:
    names = ["gpus", "global_batch", "mbs", "hidden", "heads", "layers", "seq", "tp", "dp", "pp", "ms"]
    rows = []
    with open(path) as f:
        for rec in csv.reader(f):
            if not rec or rec[0].startswith("#"):
                continue
            row = dict(zip(names, rec))
            rows.append({k: (float(v) if k == "ms" else int(v)) for k, v in row.items()})
    return rows


def predict_all(rows, cluster: ClusterSpec) -> np.ndarray:
    """Predicted iteration time (ms) of every row."""
    models: dict[tuple, CostModel] = {}
    out = []
    for r in rows:
        key = (r["hidden"], r["layers"], r["global_batch"], r["gpus"])
        cm = models.get(key)
        if cm is None:
            model = ModelSpec(name=f"gpt-h{r['hidden']}-l{r['layers']}", num_layers=r["layers"],
                              hidden_size=r["hidden"], num_heads=r["heads"], vocab_size=51200,
                              max_position_embeddings=r["seq"], tied_embeddings=True, dropout=0.1,
                              attention_kernel="eager")
            # DeepSpeed's engine all-reduces the gradients after the backward, not under it (its engine file)
            training = TrainingSpec(global_batch=r["global_batch"], seq_len=r["seq"], precision="fp16",
                                    optimizer="adam")
            gpus_per_node = min(r["gpus"], GPUS_PER_NODE)
            nodes = -(-r["gpus"] // gpus_per_node)
            cm = models[key] = CostModel(model, cluster.resized(nodes, gpus_per_node), training, engine=ENGINE)
        cfg = ParallelConfig(tp=r["tp"], pp=r["pp"], dp=r["dp"], mbs=r["mbs"], recompute="full",
                             schedule="1f1b")
        out.append(cm.evaluate(cfg).predicted.step_time_s * 1e3)
    return np.array(out)


def report(rows, pred: np.ndarray) -> None:
    meas = np.array([r["ms"] for r in rows])
    gpus = np.array([r["gpus"] for r in rows])
    print(f"{'GPUs':>5} {'rows':>5} {'MAPE %':>8} {'median APE %':>13} {'max APE %':>10} {'Spearman':>9}")
    for g in sorted(set(gpus)) + [None]:
        sel = np.ones_like(gpus, bool) if g is None else gpus == g
        ape = np.abs(pred[sel] / meas[sel] - 1) * 100
        rho = spearmanr(pred[sel], meas[sel]).statistic
        print(f"{'all' if g is None else g:>5} {sel.sum():>5} {ape.mean():>8.2f} {np.median(ape):>13.2f} "
              f"{ape.max():>10.1f} {rho:>9.4f}")


def refit(rows, cluster: ClusterSpec, quiet: bool = False) -> ClusterSpec:
    values = fit(cluster, FITTED, [r["ms"] / 1e3 for r in rows], lambda c: predict_all(rows, c) / 1e3, ENGINE)
    if not quiet:
        for p, v in values.items():
            print(f"  {p} = {v:.6g}")
    return with_params(cluster, values, ENGINE.name)


def cross_validated(rows, cluster: ClusterSpec, folds: int = 5) -> np.ndarray:
    """Each row predicted by the parameters fitted to the other folds (rows assigned round-robin)."""
    pred = np.zeros(len(rows))
    for k in range(folds):
        train = [r for i, r in enumerate(rows) if i % folds != k]
        test = [i for i in range(len(rows)) if i % folds == k]
        fitted = refit(train, cluster, quiet=True)
        pred[test] = predict_all([rows[i] for i in test], fitted)
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="refit the FITTED parameters and report with them")
    ap.add_argument("--cv", action="store_true", help="also report 5-fold cross-validated errors (refits 5 times)")
    ap.add_argument("--cluster", default=CLUSTER, help="cluster spec to evaluate (default %(default)s)")
    args = ap.parse_args()
    rows = read_rows()
    cluster = load_cluster(args.cluster)
    if args.fit:
        print("fitted parameters:")
        cluster = refit(rows, cluster)
    print(f"vTrain single-node A100 rows: {len(rows)}; cluster {cluster.name}, engine {ENGINE.name}")
    report(rows, predict_all(rows, cluster))
    if args.cv:
        print("5-fold cross-validated (each row predicted by parameters fitted without it):")
        report(rows, cross_validated(rows, cluster))


if __name__ == "__main__":
    main()
