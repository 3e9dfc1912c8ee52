"""Wall time of the full plan search on three large cases (median of 3 runs), and the plans it picks.

    python scripts/bench_search.py            # all three cases
    python scripts/bench_search.py --runs 5

Targets on a 2-core machine: under 2 s for the 1T GPT on 3,072 A100s and under 10 s for Llama-3-405B on
16,384 H100s. For each case it also prints the winner and its gain over the best plan that keeps TP = 8
inside nodes with no ZeRO (the classic Megatron-LM recipe).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.cost.model import CostModel  # noqa: E402
from planner.loaders import load_cluster, load_model  # noqa: E402
from planner.search.search import search  # noqa: E402
from planner.search.space import Constraints  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402

CASES = [  # (label, model, cluster, nodes, global batch, seq)
    ("GPT-3 175B, 1,024 A100", "gpt3-175b", "dgx-a100-80gb", 128, 1536, 2048),
    ("GPT 1T, 3,072 A100", "gpt-1t", "dgx-a100-80gb", 384, 3072, 2048),
    ("Llama-3 405B, 16,384 H100", "llama3-405b", "dgx-h100", 2048, 2048, 8192),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows, plans = [], []
    for label, model_name, cluster_name, nodes, batch, seq in CASES:
        model, cluster = load_model(model_name), load_cluster(cluster_name, nodes=nodes)
        training = TrainingSpec(global_batch=batch, seq_len=seq, precision="bf16")
        times, result = [], None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            result = search(model, cluster, training, Constraints(), top_k=5)   # a fresh cost model each run
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append((label, cluster.world_size, med, min(times), result.candidates, result.evaluated,
                     result.candidates / med, result.evaluated / med))
        cost = CostModel(model, cluster, training)
        best = cost.prediction(result.top[0])
        classic = search(model, cluster, training, Constraints(tp=8, zero=0), top_k=1, cost=cost)
        base = cost.prediction(classic.top[0]) if classic.top else None
        plans.append((label, best, base))

    print(f"{'case':<28}{'GPUs':>7}{'median s':>10}{'min s':>8}{'candidates':>12}{'costed':>8}"
          f"{'cand/s':>10}{'costed/s':>10}")
    for label, gpus, med, best_t, cands, costed, cps, eps in rows:
        print(f"{label:<28}{gpus:>7,}{med:>10.3f}{best_t:>8.3f}{cands:>12,}{costed:>8,}{cps:>10,.0f}{eps:>10,.0f}")
    print()
    for label, best, base in plans:
        p = best.predicted
        print(f"{label}: {best.config.short()} layout {'-'.join(best.config.layout)}, step {p.step_time_s:.2f} s, "
              f"{p.tflops_per_gpu:.0f} model TFLOP/s per GPU, MFU {p.mfu:.1%}, peak {p.peak_reserved_bytes / 2**30:.1f} GiB")
        if base is not None:
            gain = base.predicted.step_time_s / p.step_time_s - 1
            print(f"    best with TP=8 in nodes and no ZeRO: {base.config.short()}, step "
                  f"{base.predicted.step_time_s:.2f} s, MFU {base.predicted.mfu:.1%} -> winner is {gain:+.1%} faster")
        else:
            print("    no plan with TP=8 and no ZeRO fits in memory")


if __name__ == "__main__":
    main()
