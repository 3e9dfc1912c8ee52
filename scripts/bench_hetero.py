"""Plans on clusters of node groups, and the search's wall time (median of several runs).

    python scripts/bench_hetero.py            # the three cases, 3 runs each
    python scripts/bench_hetero.py --runs 5

1. Llama-3-70B on mixed-h100-a100 (4 DGX H100 + 8 DGX A100 nodes): the plan, its gain over the same degrees in
   naive rank order and over the best plan on either part alone.
2. Llama-3-70B on two-islands (two 8-node H100 pods, 100 Gb/s Ethernet per node between them): where the
   stages sit, and the gain over a flat plan whose DP rings cross the slow link.
3. Llama-3-70B on 1,024 mixed GPUs (48 H100 + 80 A100 nodes): the search's time (target: under 2 s on a
   2-core machine), with and without the baselines (the homogeneous searches on each part).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.hetero.report import explain  # noqa: E402
from planner.hetero.search import label, search_hetero  # noqa: E402
from planner.loaders import load_cluster, load_model  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402


def scaled_mixed(h100_nodes: int, a100_nodes: int):
    mixed = load_cluster("mixed-h100-a100")
    h, a = mixed.node_groups
    return mixed.model_copy(update={"name": f"mixed {h100_nodes} H100 + {a100_nodes} A100 nodes",
                                    "node_groups": [h.model_copy(update={"count": h100_nodes}),
                                                    a.model_copy(update={"count": a100_nodes})]})


def show(title: str, model, cluster, training) -> None:
    result = search_hetero(model, cluster, training, top_k=5)
    hc = result.cost
    best = result.top[0]
    print(f"== {title}: {cluster.world_size} GPUs, batch {training.global_batch} x {training.seq_len}")
    print(f"best: {label(best.cand)}, step {best.step:.3f} s, {training.tokens_per_step / best.step:,.0f} tokens/s")
    for line in explain(hc, result):
        print(f"  {line}")
    print()


def _cpu() -> float:
    """CPU seconds of this process and its finished children (CBC runs as a child)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(model, cluster, training, runs: int, baselines: bool) -> tuple[float, float, float, object]:
    """(median wall seconds, min wall seconds, median CPU seconds, last result): on a shared machine the CPU
    seconds are what the search costs, the wall seconds also what the other jobs take."""
    times, cpus, result = [], [], None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), _cpu()
        result = search_hetero(model, cluster, training, top_k=5, baselines=baselines)   # fresh cost models
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    return statistics.median(times), min(times), statistics.median(cpus), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    llama = load_model("llama3-70b")
    show("Llama-3-70B on mixed-h100-a100", llama, load_cluster("mixed-h100-a100"),
         TrainingSpec(global_batch=256, seq_len=4096))
    show("Llama-3-70B on two-islands", llama, load_cluster("two-islands"), TrainingSpec(global_batch=512, seq_len=4096))

    big = scaled_mixed(48, 80)
    training = TrainingSpec(global_batch=1024, seq_len=4096)
    print(f"== search time: Llama-3-70B on {big.name} ({big.world_size} GPUs), batch 1024 x 4096, top 5, "
          f"median of {args.runs}")
    for baselines in (False, True):
        med, best_t, cpu, result = timed(llama, big, training, args.runs, baselines)
        what = "search + baselines (each part alone)" if baselines else "search"
        print(f"{what:<38} median {med:.3f} s  min {best_t:.3f} s  CPU {cpu:.3f} s  ({result.candidates:,} "
              f"candidates, {result.evaluated} costed; winner {label(result.top[0].cand)}, {result.top[0].method})")


if __name__ == "__main__":
    main()
