"""Fuzz the meshplan CLI with thousands of mutated commands (tests/cli_fuzz.py) and report every answer that is
not exit 0, 2 or 3 within the time limit, with no traceback and one line on stderr for exit 2.

    python scripts/fuzz_cli.py                       # 5,000 cases, 2 worker processes
    python scripts/fuzz_cli.py --cases 20000 --seed 7 --jobs 2

Exit status 1 when any case misbehaved (each is printed with its command line).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _worker(job: tuple[int, int, float]) -> list[dict]:
    """Run `cases` cases drawn with hypothesis seed `seed`; one record per case."""
    import warnings

    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    from tests.cli_fuzz import cases, make_files, run_case

    n, s, limit = job
    warnings.filterwarnings("ignore")
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="meshplan-fuzz-") as tmp:
        files = make_files(Path(tmp))

        @seed(s)
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one(data):
            argv, must_fail = data.draw(cases(files))
            outcome = run_case(argv, limit)
            records.append({"argv": argv, "code": outcome.code, "seconds": outcome.seconds,
                            "problems": outcome.problems(must_fail), "err": outcome.err[-500:],
                            "kind": " ".join(argv[:2]) if argv[:1] == ["profile"] else argv[0]})

        one()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=5000, help="Cases in all (default 5,000).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the first worker (the others: seed + i).")
    ap.add_argument("--jobs", type=int, default=2, help="Worker processes (default 2).")
    ap.add_argument("--time-limit", type=float, default=30.0, help="Seconds one case may take (default 30).")
    args = ap.parse_args()

    start = time.perf_counter()
    per_job = -(-args.cases // args.jobs)
    jobs = [(per_job, args.seed + i, args.time_limit) for i in range(args.jobs)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        records = [r for batch in pool.map(_worker, jobs) for r in batch]
    wall = time.perf_counter() - start

    times = sorted(r["seconds"] for r in records)
    codes = Counter(str(r["code"]) for r in records)
    kinds = Counter(r["kind"] for r in records)
    bad = [r for r in records if r["problems"]]
    print(f"{len(records):,} cases in {wall:.0f} s ({args.jobs} workers, seeds {args.seed}..{args.seed + args.jobs - 1},"
          f" limit {args.time_limit:.0f} s per case)")
    print("exit codes: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(codes.items())))
    print("commands:   " + ", ".join(f"{k}: {v:,}" for k, v in sorted(kinds.items())))
    print(f"seconds per case: median {statistics.median(times):.3f}, 99th percentile "
          f"{times[int(0.99 * (len(times) - 1))]:.3f}, max {times[-1]:.2f}")
    slowest = max(records, key=lambda r: r["seconds"])
    print(f"slowest: {' '.join(slowest['argv'])[:300]} (exit {slowest['code']})")
    print(f"misbehaving cases: {len(bad)}")
    for r in bad[:50]:
        print(f"  {r['problems']}: meshplan {' '.join(r['argv'])[:400]}\n    stderr: {r['err'][-300:]!r}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
