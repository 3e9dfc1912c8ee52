"""`python -m profiler.cluster`: measure the devices and links of a cluster; run under torchrun on every node.

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m profiler.cluster -o cluster.json

Steps, every rank taking each in the same order (see profiler.coord for deadlines and failure reports):
  1. devices      each rank measures its device (GEMMs, memory bandwidth, kernel overhead, attention);
  2. links        N-1 rounds of a round-robin tournament, each pair timing both directions at every size;
  3. collectives  all-reduce, all-gather, reduce-scatter per group size, contiguous and strided groups;
  4. overlap      compute alone, all-reduce alone, both together.
Rank 0 gathers the results after each step into `<output>.partial.json` (a rerun with the same options
resumes from there) and at the end writes the ClusterSpec (`profiler.summarize`) to the output.
Exit codes: 0 done, 1 a rank failed or hung (named on stderr), 2 bad arguments or output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from profiler.io import check_output, load_raw, partial_path, save_raw, write_cluster

EXIT_INPUT = 2
INJECT_ENV = "MESHPLAN_PROFILE_INJECT"   # "<rank>:<step label prefix>:<error|hang|exit>", for testing failures

CPU_DEFAULTS = {"p2p_sizes": [4 << 10, 64 << 10, 512 << 10, 2 << 20], "collective_sizes": [64 << 10, 1 << 20, 4 << 20]}
CUDA_DEFAULTS = {"p2p_sizes": [8 << 10, 1 << 20, 32 << 20, 256 << 20],
                 "collective_sizes": [1 << 20, 64 << 20, 512 << 20]}
OVERLAP = {"cpu": {"gemm_n": 256, "message_bytes": 2 << 20}, "cuda": {"gemm_n": 8192, "message_bytes": 512 << 20}}


def parse_size(text: str) -> int:
    """'4K' / '32M' / '1G' / '4096' to bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    value = float(t[:-1] if mult > 1 else t)
    if value <= 0:
        raise ValueError(f"size must be positive (got {text})")
    return int(value * mult)


def parse_sizes(text: str | None, minimum: int, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = sorted({parse_size(s) for s in text.split(",") if s.strip()})
    except (ValueError, OverflowError):
        raise ValueError(f"{what}: '{text[:60]}' is not a comma-separated list of sizes like 4K,1M,32M") from None
    if len(sizes) < minimum:
        raise ValueError(f"{what}: give at least {minimum} different sizes (got {text})")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiler.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, help="Cluster file to write (.json, .yaml or .yml).")
    p.add_argument("--force", action="store_true", help="Overwrite the output and discard partial results.")
    p.add_argument("--name", default=None, help="Cluster name in the file (default measured-<host>-<ranks>).")
    p.add_argument("--p2p-sizes", default=None, help="Point-to-point message sizes, >= 3 (default by device).")
    p.add_argument("--collective-sizes", default=None, help="Collective message sizes (default by device).")
    p.add_argument("--reps", type=int, default=5, help="Timed repetitions per measurement (the median is kept; point-to-point "
                        "links keep the minimum of twice as many, collectives the median of three times as many).")
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds one step may take on one rank.")
    p.add_argument("--collective-timeout", type=float, default=120.0,
                   help="Seconds one collective or transfer may block before it fails.")
    p.add_argument("--raw", default=None, help="Also write the raw measurements (JSON) here.")
    p.add_argument("--error-file", default=None, help="Append failure reports here (one line each).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p


def _input_error(message: str, error_file: str | None, rank: int) -> None:
    if rank == 0:
        print(f"meshplan profile cluster: error: {message}", file=sys.stderr, flush=True)
        if error_file:
            with open(error_file, "a") as f:
                f.write(f"input\t{message}\n")
    sys.exit(EXIT_INPUT)


def _inject(rank: int, label: str) -> None:
    """Fault injection for tests of the failure reports (MESHPLAN_PROFILE_INJECT)."""
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return
    r, prefix, mode = spec.split(":", 2)
    if int(r) != rank or not label.startswith(prefix):
        return
    if mode == "hang":
        while True:
            time.sleep(1)
    if mode == "exit":
        os._exit(9)
    raise RuntimeError(f"injected failure ({INJECT_ENV})")


# Collectives are timed over this many times --reps: a collective waits for the slowest rank's arrival, and where
# processes share cores (gloo's threads beside the ranks') one call in four or more waits a scheduler time slice.
# On a 2-core VM, gloo at 64 KB-4 MB: p25 0.2-3.5 ms, p75 0.4-5.4 ms (30 calls each); medians of 5 calls of one
# machine differed 4x between two profiles (reduce-scatter of 1 MB: 0.9 and 3.8 ms).
COLLECTIVE_REPS = 3


def estimate_seconds(world: int, cuda: bool, p2p: list[int], coll: list[int], reps: int) -> float:
    """A rough duration of the run from nominal link speeds (CPU/gloo: 1 GB/s, 0.5 ms; CUDA: 10 GB/s,
    20 us), for the estimate printed before it starts."""
    from profiler.collectives import partitions
    from profiler.links import round_robin
    bw, lat = (10e9, 20e-6) if cuda else (1e9, 0.5e-3)
    per = COLLECTIVE_REPS * reps + 3
    device = 25.0 if cuda else 3.0
    link_round = sum(2 * (2 * reps + 2) * (2 * lat + m / bw) * (3 if m <= 1 << 16 else 1) for m in p2p)
    links = len(round_robin(world)) * (link_round + 0.1)
    coll_step = sum(per * 3 * (2 * (world - 1) * lat + 2 * m / bw) * (4 if m <= 1 << 18 else 1) for m in coll)
    colls = len(partitions(world)) * (coll_step + 0.5)
    return device + links + colls + (10.0 if cuda else 2.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            print(f"meshplan profile cluster: error: {var} is not set; run under torchrun "
                  f"(torchrun --nproc-per-node G -m profiler.cluster ...) or use `meshplan profile cluster --nproc G`",
                  file=sys.stderr)
            return EXIT_INPUT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    try:
        p2p_sizes = parse_sizes(args.p2p_sizes, 3, "--p2p-sizes")
        coll_sizes = parse_sizes(args.collective_sizes, 1, "--collective-sizes")
    except ValueError as exc:
        _input_error(str(exc), args.error_file, rank)
    if world < 2:
        _input_error("profile cluster needs at least 2 processes (links and collectives need a peer)",
                     args.error_file, rank)
    if world % local_world:
        _input_error(f"{world} ranks do not split into nodes of {local_world}", args.error_file, rank)
    if args.reps < 1 or args.timeout <= 0 or args.collective_timeout <= 0:
        _input_error("--reps, --timeout and --collective-timeout must be positive", args.error_file, rank)

    import torch
    import torch.distributed as dist

    from profiler.coord import Coordinator
    from profiler.devices import current_device

    device = current_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.collective_timeout),
                            device_id=device if cuda else None)
    control = dist.new_group(backend="gloo") if cuda else None
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    config = {"world_size": world, "gpus_per_node": local_world, "backend": backend, "device_type": device.type,
              "p2p_sizes": p2p_sizes or defaults["p2p_sizes"],
              "collective_sizes": coll_sizes or defaults["collective_sizes"], "reps": args.reps}

    # --- rank 0 checks the output and loads partial results; everyone learns what is left to do
    output = Path(args.output)
    setup: list = [None]
    if rank == 0:
        from planner.errors import InputError
        try:
            check_output(output, args.force)
            raw, resumed = load_raw(partial_path(output), config, restart=args.force)
            setup[0] = {"done": list(raw["done"]), "resumed": resumed}
        except InputError as exc:
            setup[0] = {"error": str(exc)}
    dist.broadcast_object_list(setup, src=0, group=control)
    if "error" in setup[0]:
        _input_error(setup[0]["error"], args.error_file, rank)
    done = set(setup[0]["done"])

    coord = Coordinator(rank, world, args.timeout, args.error_file, barrier_group=control)
    steps = plan_steps(world, config)
    todo = [s for s in steps if s[0] not in done]
    progress = None
    if rank == 0:
        progress = _Progress(len(steps), len(steps) - len(todo), not args.no_progress)
        est = estimate_seconds(world, cuda, config["p2p_sizes"], config["collective_sizes"], args.reps)
        what = "resuming" if setup[0]["resumed"] else "profiling"
        progress.note(f"{what} {world} {device.type} ranks ({world // local_world} node(s) x {local_world}), "
                      f"backend {backend}: {len(todo)} of {len(steps)} steps, about {est:.0f} s of measurement")
    t_start = time.perf_counter()
    for key, label, kind, arg in todo:
        if progress:
            progress.start(label)
        t_step = time.perf_counter()
        with coord.step(label):
            _inject(rank, label)
            local = run_step(kind, arg, rank, world, local_world, device, config)
            result = _gather(local, world, control, rank)
        if rank == 0:
            merge(raw, key, kind, arg, result)
            raw["done"].append(key)
            raw.setdefault("step_s", {})[key] = time.perf_counter() - t_step
            save_raw(partial_path(output), raw)
            progress.advance()
    coord.close()

    if rank == 0:
        from profiler.summarize import summarize
        raw["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        raw["elapsed_s"] = time.perf_counter() - t_start
        try:
            spec, details = summarize(raw, args.name)
        except Exception as exc:   # noqa: BLE001 - a fit that cannot be made is a failed run, said in one line
            coord.fail(f"rank 0 could not fit the measurements: {type(exc).__name__}: {exc}", True)
        write_cluster(output, spec)
        if args.raw:
            raw["fits"] = details
            save_raw(Path(args.raw), raw)
        partial_path(output).unlink(missing_ok=True)
        progress.finish()
        print_summary(spec, details, output, time.perf_counter() - t_start)
    dist.barrier(group=control)
    dist.destroy_process_group()
    return 0


def plan_steps(world: int, config: dict) -> list[tuple[str, str, str, object]]:
    """(key, label, kind, argument) of every step of a run, in order."""
    from profiler.collectives import partitions
    from profiler.links import round_robin
    steps = [("devices", "devices", "devices", None)]
    rounds = round_robin(world)
    for i, pairs in enumerate(rounds):
        steps.append((f"links/{i}", f"links round {i + 1}/{len(rounds)}", "links", pairs))
    for g, contiguous in partitions(world):
        kind = "contiguous" if contiguous else "strided"
        steps.append((f"collectives/{g}/{kind}", f"collectives {g} ranks {kind}", "collectives", (g, contiguous)))
    steps.append(("overlap", "overlap", "overlap", None))
    return steps


def run_step(kind: str, arg, rank: int, world: int, local_world: int, device, config: dict):
    """This rank's measurements of one step (every rank calls it with the same arguments)."""
    import torch.distributed as dist
    reps = config["reps"]
    if kind == "devices":
        from profiler.devices import measure_device
        return measure_device(device, local_world, sync=dist.barrier)
    if kind == "links":
        from profiler.links import measure_round
        return measure_round(arg, rank, config["p2p_sizes"], device, 2 * reps)
    if kind == "collectives":
        from profiler.collectives import measure_partition, partition
        g, contiguous = arg
        mine, _groups = dist.new_subgroups_by_enumeration(partition(world, g, contiguous))
        return measure_partition(mine, g, config["collective_sizes"], device, COLLECTIVE_REPS * reps)
    if kind == "overlap":
        from profiler.devices import main_dtype
        from profiler.overlap import measure_overlap
        o = OVERLAP[device.type]
        return measure_overlap(device, main_dtype(device), o["gemm_n"], o["message_bytes"], max(3, reps - 2))
    raise ValueError(f"unknown step kind {kind}")


def _gather(local, world: int, group, rank: int):
    import torch.distributed as dist
    out = [None] * world if rank == 0 else None
    dist.gather_object(local, out, dst=0, group=group)
    return out


def merge(raw: dict, key: str, kind: str, arg, per_rank: list) -> None:
    """Fold the gathered results of one step into the raw profile."""
    if kind == "devices":
        raw["devices"] = {str(r): d for r, d in enumerate(per_rank)}
    elif kind == "links":
        merged = {}
        for part in per_rank:
            merged.update(part)
        raw["links"][key.split("/", 1)[1]] = merged
    elif kind == "collectives":
        g, contiguous = arg
        for i, row in enumerate(per_rank[0]):
            slowest = max(part[i]["time_s"] for part in per_rank)
            raw["collectives"].append({"op": row["op"], "group_size": g, "contiguous": contiguous,
                                       "message_bytes": row["message_bytes"], "time_s": slowest})
    elif kind == "overlap":
        raw["overlap"] = per_rank


class _Progress:
    """A rich progress bar of the steps on rank 0 (stdout; stderr carries failures), shown on a terminal."""

    def __init__(self, total: int, completed: int, enabled: bool):
        from rich.console import Console
        self.console = Console(highlight=False)
        self.bar = None
        self.total, self.completed = total, completed
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task("starting", total=total, completed=completed)
            self.bar.start()

    def note(self, text: str) -> None:
        self.console.print(text)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=label)

    def advance(self) -> None:
        self.completed += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_summary(spec, details: dict, output: Path, elapsed: float) -> None:
    """Headline numbers of the measured cluster (stdout)."""
    import statistics
    g = spec.gpu
    key = spec.nodes.gpu_type
    d = details[key]
    lm = spec.link_matrix
    off = [(i, j) for i in range(lm.world_size) for j in range(lm.world_size) if i != j]
    bws = [lm.bandwidth[i][j] for i, j in off]
    lats = [lm.latency[i][j] for i, j in off]
    lines = [f"wrote {output} in {elapsed:.1f} s",
             f"device  {g.name}: GEMM up to {d['gemm_rate'] / 1e9:.1f} GFLOP/s (tile {g.efficiency.gemm_tile:.1f}, "
             f"fit error {100 * d['gemm_fit_rms_log_error']:.0f}%), copy {d['copy_bandwidth'] / 1e9:.1f} GB/s, "
             f"kernel overhead {g.efficiency.kernel_overhead_s * 1e6:.1f} us",
             f"p2p     bandwidth {min(bws) / 1e9:.2f}-{max(bws) / 1e9:.2f} GB/s (median "
             f"{statistics.median(bws) / 1e9:.2f}), latency {min(lats) * 1e6:.0f}-{max(lats) * 1e6:.0f} us",
             ]
    ar = [c for c in spec.collectives if c.op == "all_reduce" and c.group_size == lm.world_size]
    if ar:
        best = max(ar, key=lambda c: c.message_bytes)
        lines.append(f"all-reduce over {lm.world_size}: bus bandwidth {best.bus_bandwidth / 1e9:.2f} GB/s at "
                     f"{best.message_bytes / 2 ** 20:.1f} MiB; overlap slow-down {spec.overlap_slowdown:.2f}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
