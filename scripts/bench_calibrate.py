"""How long `meshplan calibrate` takes for tens of runs: choosing the parameters, the fit and the leave-one-out
refits (median of several repeats).

    python scripts/bench_calibrate.py              # 16 and 32 runs, 3 repeats each
    python scripts/bench_calibrate.py --runs 48 --repeats 1

The runs are synthesised on one 8-GPU dgx-h100 node: every model x configuration below that the planner accepts,
predicted with known parameters (gemm_max 0.6, host 30 us per kernel, an allocator margin of 0.12) and 3%
log-normal noise, so the fit has residuals to work through as with measured runs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.calibrate import with_params  # noqa: E402
from planner.calibration.result import calibrate  # noqa: E402
from planner.calibration.runs import MeasuredRun  # noqa: E402
from planner.cost.model import CostModel  # noqa: E402
from planner.engine import load_engine  # noqa: E402
from planner.errors import InputError  # noqa: E402
from planner.layout import DEFAULT_ORDER  # noqa: E402
from planner.loaders import load_cluster  # noqa: E402
from planner.presets import PRESETS  # noqa: E402
from planner.specs import ParallelConfig, TrainingSpec  # noqa: E402
from planner.validate import check_config  # noqa: E402

TRUTH = {"gpu.efficiency.gemm_max": 0.6, "engine.host.per_kernel_s": 30e-6, "gpu.allocator_margin": 0.12}
MODELS = ("gpt3-1.3b", "llama3.2-1b", "gpt3-2.7b", "llama3-8b", "gpt-tiny", "llama-tiny")
CONFIGS = [dict(tp=tp, pp=pp, dp=8 // (tp * pp), mbs=mbs, zero=zero, recompute=rec)
           for tp, pp, mbs, zero, rec in [(1, 1, 1, 0, "none"), (2, 1, 2, 1, "none"), (1, 2, 2, 0, "full"),
                                          (8, 1, 1, 0, "selective"), (4, 2, 1, 0, "full"), (2, 2, 1, 3, "none"),
                                          (1, 1, 2, 3, "none"), (2, 1, 1, 0, "full")]]


def synthesise(count: int) -> list[MeasuredRun]:
    cluster, engine = load_cluster("dgx-h100"), load_engine()
    truth = with_params(cluster, TRUTH, engine.name)
    rng = np.random.default_rng(0)
    runs = []
    for name, cfg in itertools.product(MODELS, CONFIGS):
        if len(runs) == count:
            break
        model, training = PRESETS[name], TrainingSpec(global_batch=64, seq_len=1024 if "tiny" not in name else 256)
        config = ParallelConfig(**cfg)
        try:
            check_config(model, cluster, training, config, engine)
        except InputError:
            continue
        core = CostModel(model, truth, training, engine=engine).evaluate_core(config)
        runs.append(MeasuredRun(f"{name} {config.short()}", model, training, 1, 8, config, DEFAULT_ORDER, None,
                                False, core.step * float(np.exp(rng.normal(0, 0.03))), round(core.peak_reserved)))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, action="append", help="run counts to time (default 16 and 32)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cluster, engine = load_cluster("dgx-h100"), load_engine()
    print(f"{'runs':>5} {'fitted':>7} {'predictions':>12} {'median s':>9} {'min s':>7} {'ms/prediction':>14}"
          f" {'error %':>8} {'left out %':>11}")
    for count in args.runs or [16, 32]:
        runs = synthesise(count)
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = calibrate(cluster, engine, runs)
            seconds.append(time.perf_counter() - t0)
        rec = result.record
        print(f"{len(runs):>5} {len(rec.parameters):>7} {result.evaluated:>12,} {statistics.median(seconds):>9.1f} "
              f"{min(seconds):>7.1f} {statistics.median(seconds) / result.evaluated * 1e3:>14.2f} "
              f"{rec.error_after_pct:>8.2f} {rec.loo_error_pct:>11.2f}")


if __name__ == "__main__":
    main()
