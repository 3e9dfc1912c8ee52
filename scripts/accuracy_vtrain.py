"""vTrain's 1,440 Megatron-DeepSpeed iterations in detail: the error per GPU count, and how much of what is left
any smooth correction of the cost model could remove.

Data: ../shared/reference/vtrain_single_node_a100.csv (vTrain, MICRO 2024): one node of 2, 4 or 8 A100s, GPT
models (h 1024/2048, 16 heads, 12-24 layers, seq 1024, vocab 51,200), fp16, full recomputation, 1F1B, eager
attention with dropout, ZeRO off. Each row is predicted exactly as `scripts/accuracy_public.py --set vtrain`
predicts it (the set is defined there once); `scripts/fit_a100.py` fits the cluster file's parameters.

    python scripts/accuracy_vtrain.py            # MAPE, median and max APE, Spearman per GPU count
    python scripts/accuracy_vtrain.py --cv       # also 5-fold cross-validated calibration (about 6 minutes)
    python scripts/accuracy_vtrain.py --floor    # what is left of the error, by cell and under smooth corrections

`--floor` takes the log residuals log(predicted / measured) and asks two questions:
  1. where they sit: the residual left after removing each (hidden, tp, micro-batch) cell's median, against
     removing the median of coarser groupings (a table of per-cell factors: an upper bound on what any
     cell-wise correction could do in sample, not a model);
  2. what a smooth correction could reach: polynomials of degree 1-3 in log2 of hidden size, tp and micro-batch
     (4 to 20 coefficients), fitted on 4 folds and scored on the 5th, the same folds as the cross-validation.
     A physical term that varies smoothly with the shapes (a GEMM curve, a host or latency cost, a bandwidth)
     is such a correction or a simpler one; if the degree-3 polynomial does not reach a target, no smooth
     refinement of the model will.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import accuracy_public as sets  # noqa: E402

FOLDS = 5
COLUMNS = ["gpus", "global_batch", "mbs", "hidden", "heads", "layers", "seq", "tp", "dp", "pp"]


def read_rows() -> list[dict[str, int]]:
    """The configuration of every row, in the file's order (the order of `sets.vtrain_set().cases`)."""
    with open(sets.REFERENCE / "vtrain_single_node_a100.csv") as f:
        return [dict(zip(COLUMNS, map(int, rec[:-1]))) for rec in csv.reader(f) if rec and not rec[0].startswith("#")]


def report(rows: list[dict[str, int]], pred: np.ndarray, meas: np.ndarray) -> None:
    gpus = np.array([r["gpus"] for r in rows])
    print(f"{'GPUs':>5} {'rows':>5} {'MAPE %':>8} {'median APE %':>13} {'max APE %':>10} {'Spearman':>9}")
    for g in sorted(set(gpus)) + [None]:
        sel = np.ones_like(gpus, bool) if g is None else gpus == g
        ape = np.abs(pred[sel] / meas[sel] - 1) * 100
        rho = spearmanr(pred[sel], meas[sel]).statistic
        print(f"{'all' if g is None else g:>5} {sel.sum():>5} {ape.mean():>8.2f} {np.median(ape):>13.2f} "
              f"{ape.max():>10.1f} {rho:>9.4f}")


def mape(log_residual: np.ndarray) -> float:
    return float(np.mean(np.abs(np.expm1(log_residual))) * 100)


def without_group_medians(r: np.ndarray, rows: list[dict[str, int]], keys: tuple[str, ...]) -> np.ndarray:
    """The log residuals less the median of each group of rows sharing `keys`."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row[k] for k in keys), []).append(i)
    out = r.copy()
    for members in groups.values():
        out[members] -= np.median(r[members])
    return out


def polynomial_features(rows: list[dict[str, int]], degree: int) -> np.ndarray:
    """1 and every monomial up to `degree` in log2 of hidden size, tp and micro-batch: one row per run."""
    axes = [np.log2([r[k] for r in rows]) for k in ("hidden", "tp", "mbs")]
    cols = [np.ones(len(rows))]
    for d in range(1, degree + 1):
        cols += [np.prod(c, axis=0) for c in itertools.combinations_with_replacement(axes, d)]
    return np.array(cols).T


def cross_validated_correction(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The log residuals after a least-squares correction x @ c fitted on the other folds (round-robin rows)."""
    out = np.empty_like(r)
    fold = np.arange(len(r)) % FOLDS
    for k in range(FOLDS):
        c, *_ = np.linalg.lstsq(x[fold != k], r[fold != k], rcond=None)
        out[fold == k] = r[fold == k] - x[fold == k] @ c
    return out


def floor(rows: list[dict[str, int]], pred: np.ndarray, meas: np.ndarray) -> None:
    r = np.log(pred / meas)
    print(f"\nresidual MAPE {mape(r):.2f}% as predicted; after removing group medians (in sample, a table):")
    for keys in [("tp",), ("mbs",), ("hidden", "tp"), ("tp", "mbs"), ("gpus", "tp", "mbs"), ("tp", "pp", "mbs"),
                 ("hidden", "tp", "mbs")]:
        n = len({tuple(row[k] for k in keys) for row in rows})
        print(f"  {' x '.join(keys):<22} {n:>3} groups  {mape(without_group_medians(r, rows, keys)):6.2f}%")
    print(f"smooth corrections in log2(hidden, tp, micro-batch), {FOLDS}-fold cross-validated:")
    for degree in (1, 2, 3):
        x = polynomial_features(rows, degree)
        print(f"  degree {degree} ({x.shape[1]:>2} coefficients)          "
              f"{mape(cross_validated_correction(r, x)):6.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv", action="store_true", help=f"also the {FOLDS}-fold cross-validated calibration")
    ap.add_argument("--floor", action="store_true", help="where the residual sits, and what smooth corrections reach")
    args = ap.parse_args()
    st, rows = sets.vtrain_set(), read_rows()
    assert len(rows) == len(st.cases)
    meas = np.array([c.measured_s for c in st.cases])
    pred = sets.predict(st.cases, st.cluster)
    print(f"vTrain single-node A100 rows: {len(rows)}; cluster {st.cluster.name}, engine {st.engine.name}")
    report(rows, pred, meas)
    if args.cv:
        print(f"{FOLDS}-fold cross-validated (each row predicted by parameters fitted without it):")
        report(rows, sets.cross_validated(st), meas)
    if args.floor:
        floor(rows, pred, meas)


if __name__ == "__main__":
    main()
