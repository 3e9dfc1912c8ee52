"""Wall time of the plan search for mixture-of-experts models with expert parallelism in the space (median of 3
runs, and the median CPU seconds of this process, which other jobs on a shared machine inflate less), the plans
it picks and why expert parallelism wins or loses there.

    python scripts/bench_moe_search.py            # every case
    python scripts/bench_moe_search.py --runs 5
    python scripts/bench_moe_search.py --only DeepSeek

Target on a 2-core machine: under 2 s for DeepSeek-V3 (671B, multi-head latent attention, 256 experts) and
Qwen3-235B-A22B on 2,048 H100s (256 DGX H100 nodes), for the Megatron-LM engine, and for Qwen3 also meshplan's
own engine (which runs more ZeRO and schedule choices, so its space is three times larger). Mixtral 8x7B on 16 H100s (Megatron-LM engine) at two batch sizes: where expert
parallelism is faster and where it is not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.cost.model import CostModel  # noqa: E402
from planner.engine import load_engine  # noqa: E402
from planner.loaders import load_cluster, load_model  # noqa: E402
from planner.search.expert_parallel import explain  # noqa: E402
from planner.search.search import search  # noqa: E402
from planner.search.space import Constraints  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402

CASES = [  # (label, model, cluster, nodes, global batch, seq, engine)
    ("DeepSeek-V3, 2,048 H100", "deepseek-v3", "dgx-h100", 256, 2048, 4096, "megatron"),
    ("Qwen3-235B-A22B, 2,048 H100", "qwen3-235b-a22b", "dgx-h100", 256, 2048, 4096, "megatron"),
    ("  the same, meshplan engine", "qwen3-235b-a22b", "dgx-h100", 256, 2048, 4096, "meshplan"),
    ("Mixtral 8x7B, 16 H100, 64k tok", "mixtral-8x7b", "dgx-h100", 2, 32, 2048, "megatron"),
    ("Mixtral 8x7B, 16 H100, 1M tok", "mixtral-8x7b", "dgx-h100", 2, 256, 4096, "megatron"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the cases whose label contains this text")
    args = ap.parse_args()
    rows, plans = [], []
    for label, model_name, cluster_name, nodes, batch, seq, engine_name in CASES:
        if args.only not in label:
            continue
        model, cluster = load_model(model_name), load_cluster(cluster_name, nodes=nodes)
        training = TrainingSpec(global_batch=batch, seq_len=seq, precision="bf16")
        engine = load_engine(engine_name)
        times, cpu, result, cost = [], [], None, None
        for _ in range(args.runs):
            t0, c0 = time.perf_counter(), time.process_time()
            cost = CostModel(model, cluster, training, engine=engine)      # a fresh cost model each run
            result = search(model, cluster, training, Constraints(), top_k=5, cost=cost)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        eps = {cand.ep for cand in (core.cfg for core in result.top)}
        rows.append((label, cluster.world_size, statistics.median(times), min(times), statistics.median(cpu),
                     result.candidates, result.evaluated, sorted(eps)))
        plans.append((label, cost.prediction(result.top[0]), explain(cost, result.top[0])))

    print(f"{'case':<32}{'GPUs':>7}{'median s':>10}{'min s':>8}{'CPU s':>8}{'candidates':>12}{'costed':>8}"
          f"  ep in top 5")
    for label, gpus, med, best_t, cpu_s, cands, costed, eps in rows:
        print(f"{label:<32}{gpus:>7,}{med:>10.3f}{best_t:>8.3f}{cpu_s:>8.3f}{cands:>12,}{costed:>8,}  {eps}")
    print()
    for label, best, why in plans:
        q = best.predicted
        print(f"{label}: {best.config.short()}  step {q.step_time_s:.2f} s, MFU {q.mfu:.1%} (active parameters), "
              f"EP all-to-all {q.time.ep_comm:.2f} s, peak {q.peak_reserved_bytes / 2 ** 30:.1f} GiB")
        print(f"  {why}")


if __name__ == "__main__":
    main()
