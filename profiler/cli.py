"""`meshplan profile model` and `meshplan profile cluster`.

Torch is imported only inside the commands, so `meshplan estimate` and `meshplan plan` start fast.
User errors are `planner.errors.InputError` (one line, exit 2); a failed measurement run is
`profiler.errors.ProfileFailed` (one line naming the rank or measurement, exit 4).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, get_args

import typer

from planner.errors import InputError
from planner.limits import check_option
from planner.outputs import check_new_output
from planner.specs import Optimizer, Precision, Recompute

profile_app = typer.Typer(help="Measure per-layer costs and links on the real devices.", no_args_is_help=True)

RECOMPUTE = get_args(Recompute)
PRECISIONS = get_args(Precision)
OPTIMIZERS = get_args(Optimizer)


def _int_list(text: str, field: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"'{text[:60]}' is not a comma-separated list of integers", field=field) from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"'{text[:60]}' must list integers >= 1", field=field)
    for value in values:
        check_option(value, field)
    return sorted(set(values))


def _console():
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- model
@profile_app.command("model")
def profile_model(
    model: str = typer.Option(..., "--model", "-m", help="Preset name, a YAML/JSON ModelSpec file, or a Hugging "
                                                         "Face config.json."),
    output: Path = typer.Option(..., "--output", "-o", help="Profile file to write (.json)."),
    tp: Optional[str] = typer.Option(None, "--tp", help="TP shard sizes to measure, e.g. 1,2,4,8 (default: those "
                                                        "of 1,2,4,8 that divide the model)."),
    mbs: str = typer.Option("1,2,4", "--mbs", help="Micro-batch sizes (sequences)."),
    seq: int = typer.Option(2048, "--seq", "-s", help="Tokens per sequence."),
    precision: str = typer.Option("bf16", "--precision", help="bf16 | fp16 | amp-bf16 | fp32 (on CPU the runtime "
                                                              "and so the profile compute in fp32)."),
    recompute: str = typer.Option("none,full", "--recompute", help="Recompute modes: any of none,selective,full."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adam | adamw | sgd: the optimizer step timed."),
    reps: int = typer.Option(5, "--reps", help="Timed repetitions per measurement (median)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed repetitions first."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds one measurement may take."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads torch uses (CPU profiles)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output and discard partial results."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
):
    """Per-layer forward/backward time and activation bytes of a model's block (per TP shard size,
    micro-batch size and recompute mode), embedding, LM head with loss, and optimizer step, on this device.

    Example: meshplan profile model -m llama3-8b --tp 1,2,4,8 --mbs 1,2 --seq 4096 -o llama8b.profile.json
    """
    from planner.loaders import load_model
    from planner.validate import tp_shards
    from profiler.io import check_output
    from profiler.model import is_incomplete_profile, profile_model as run

    for value, field in ((seq, "--seq"), (reps, "--reps"), (warmup, "--warmup"), (timeout, "--timeout"),
                         (threads, "--threads")):
        check_option(value, field)
    spec = load_model(model)
    # an output marked incomplete is not overwritten but completed: the rerun resumes it
    check_output(output, force or is_incomplete_profile(output), "--output", (".json",))
    if precision not in PRECISIONS:
        raise InputError(f"'{precision}' is not one of {', '.join(PRECISIONS)}", field="--precision")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"'{optimizer}' is not one of {', '.join(OPTIMIZERS)}", field="--optimizer")
    modes = [m.strip() for m in recompute.split(",") if m.strip()]
    bad = [m for m in modes if m not in RECOMPUTE]
    if not modes or bad:
        raise InputError(f"'{recompute}' must list modes from {', '.join(RECOMPUTE)}", field="--recompute")
    from runtime.checks import unsupported
    if unsupported(spec):
        raise InputError(unsupported(spec), field="--model")
    if spec.position_embedding == "learned" and seq > spec.max_position_embeddings:
        raise InputError(f"{seq} exceeds the model's max_position_embeddings {spec.max_position_embeddings} "
                         f"(learned positions)", field="--seq")
    if tp is None:
        tps = [t for t in (1, 2, 4, 8) if tp_shards(spec, t) is None]
    else:
        tps = _int_list(tp, "--tp")
        for t in tps:
            why = tp_shards(spec, t)
            if why:
                raise InputError(why, field="--tp")
    mbss = _int_list(mbs, "--mbs")
    console = _console()
    prof = run(spec, precision, seq, tps, mbss, list(dict.fromkeys(modes)), output, optimizer=optimizer,
               force=force, warmup=warmup, reps=reps, timeout_s=timeout, threads=threads, console=console,
               progress=not no_progress)
    console.print(f"wrote {output}: {len(prof.blocks)} block, {len(prof.ends)} embedding/head measurements "
                  f"({prof.device.name}){'' if prof.complete else ', incomplete'}")


# ---------------------------------------------------------------------------------------------- cluster
@profile_app.command("cluster")
def profile_cluster(
    output: Path = typer.Option(..., "--output", "-o", help="Cluster file to write (.json, .yaml or .yml); "
                                                            "`--cluster` reads it."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes (devices) on this node (default: the "
                                                              "CUDA device count; required without CUDA)."),
    name: Optional[str] = typer.Option(None, "--name", help="Cluster name in the file."),
    p2p_sizes: Optional[str] = typer.Option(None, "--p2p-sizes", help="Point-to-point sizes, at least 3, e.g. "
                                                                      "4K,512K,2M (default by device)."),
    collective_sizes: Optional[str] = typer.Option(None, "--collective-sizes", help="Collective sizes, e.g. 1M,64M."),
    reps: int = typer.Option(5, "--reps", help="Timed repetitions per measurement."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds one step may take on one rank."),
    collective_timeout: float = typer.Option(120.0, "--collective-timeout",
                                             help="Seconds one collective or transfer may block."),
    raw: Optional[Path] = typer.Option(None, "--raw", help="Also write the raw measurements (JSON) here."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output and discard partial results."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
):
    """Devices, every link (latency and bandwidth per rank pair), collectives and compute/communication
    overlap of THIS node, through torchrun with --nproc processes. For several nodes run
    `torchrun --nnodes N --nproc-per-node G ... -m profiler.cluster -o cluster.json` on each node.

    Example: meshplan profile cluster --nproc 8 -o cluster.json && meshplan estimate --cluster cluster.json ...
    """
    from profiler.cluster import parse_sizes
    from profiler.errors import ProfileFailed
    from profiler.io import check_output, partial_path

    for value, field in ((nproc, "--nproc"), (reps, "--reps"), (timeout, "--timeout"),
                         (collective_timeout, "--collective-timeout")):
        check_option(value, field)
    check_output(output, force, "--output")
    if raw is not None:
        check_new_output(raw, force, "--raw")
    for text, minimum, field in ((p2p_sizes, 3, "--p2p-sizes"), (collective_sizes, 1, "--collective-sizes")):
        try:
            for size in parse_sizes(text, minimum, field) or ():
                check_option(size, field)
        except ValueError as exc:
            raise InputError(str(exc).split(": ", 1)[1], field=field) from None
    if nproc is None:
        import torch
        nproc = torch.cuda.device_count()
        if nproc == 0:
            raise InputError("no CUDA device here: say how many CPU processes to run, e.g. --nproc 8",
                             field="--nproc")
    if nproc < 2:
        raise InputError(f"needs at least 2 processes (got {nproc})", field="--nproc")

    if not force:
        known = {"world_size": nproc, "gpus_per_node": nproc, "reps": reps}
        for key, text, minimum in (("p2p_sizes", p2p_sizes, 3), ("collective_sizes", collective_sizes, 1)):
            if text is not None:
                known[key] = parse_sizes(text, minimum, key)
        precheck_partial(partial_path(output), known)

    args = ["-o", str(output), "--reps", str(reps), "--timeout", str(timeout),
            "--collective-timeout", str(collective_timeout)]
    for flag, value in (("--name", name), ("--p2p-sizes", p2p_sizes), ("--collective-sizes", collective_sizes),
                        ("--raw", str(raw) if raw else None)):
        if value is not None:
            args += [flag, value]
    if force:
        args.append("--force")
    if no_progress:
        args.append("--no-progress")
    rc, errors, log = launch_cluster_profile(nproc, args)
    for kind, message in errors:
        if kind == "input":
            Path(log).unlink(missing_ok=True)       # the message says it all; the log is kept for failures
            raise InputError(message)
    if errors:
        raise ProfileFailed(f"{errors[0][1]} (partial results kept in {partial_path(output)}; rerun to resume; "
                            f"log {log})")
    if rc != 0:
        raise ProfileFailed(f"torchrun exited with code {rc} without a report; see {log}")
    Path(log).unlink(missing_ok=True)


def precheck_partial(path: Path, known: dict) -> None:
    """Refuse, before starting any process, partial results measured with other settings than those
    known here (the workers check the full configuration again)."""
    import json
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError, RecursionError):
        raise InputError(f"cannot read the partial results '{path}'; delete it or pass --force",
                         field="--output") from None
    diff = sorted(k for k, v in known.items() if k in config and config[k] != v)
    if diff:
        raise InputError(f"partial results '{path}' were measured with other settings ({', '.join(diff)}); "
                         f"rerun with the same ones to resume, or pass --force to start over", field="--output")


def launch_cluster_profile(nproc: int, args: list[str]) -> tuple[int, list[tuple[str, str]], str]:
    """Run `python -m profiler.cluster` under torchrun on this node; returns (exit code, reported errors as
    (kind, message), path of the log of torchrun's stderr)."""
    fd, err_path = tempfile.mkstemp(prefix="meshplan-profile-", suffix=".errors")
    os.close(fd)
    log_fd, log_path = tempfile.mkstemp(prefix="meshplan-profile-", suffix=".log")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "-m", "profiler.cluster", *args, "--error-file", err_path]
    try:
        with os.fdopen(log_fd, "w") as log:
            rc = subprocess.call(cmd, stderr=log, env=env)
        errors = []
        with open(err_path) as f:
            for line in f:
                kind, _, message = line.rstrip("\n").partition("\t")
                if message:
                    errors.append((kind, message))
    finally:
        Path(err_path).unlink(missing_ok=True)
    return rc, errors, log_path
