"""The entry point under torchrun: `python -m torch.distributed.run ... -m runtime.train --plan plan.json`.

Every rank reads the plan, checks it against the processes started (exit 2 on any mismatch, before
training), joins the process group (NCCL on GPU, gloo on CPU), builds its part of the model as the plan
says (runtime.parallelize, runtime.pipeline), trains for --steps, checkpoints every --checkpoint-every
steps, and rank 0 gathers every rank's measurements and writes the run report (runtime.report).

Errors: a user error (InputError) prints one line and exits 2; any other exception prints its traceback and
exits 1. With --job-dir a failing rank first writes job-dir/errors/rank<R>.json ({rank, kind, message, time};
kind "input", "crash", or "peer" for a collective that failed because another rank went away), written to a
temporary file, fsynced and renamed, before anything else can happen to the process; then it leaves at once
(os._exit), without tearing down a process group whose peers may be blocked, so that no teardown abort can
replace its report. `meshplan run` reads these files to say which rank failed first and why. A rank that
succeeded leaves the same way, after a last barrier. Each rank dies with torchrun (runtime.process).

Progress: with --progress-protocol rank 0 prints one line per step, `@meshplan-progress {json}`, that
`meshplan run` turns into a progress bar; otherwise it prints plain lines.

Testing hook: MESHPLAN_INJECT_FAULT="RANK:STEP[:KIND],..." makes that rank fail at that step: `raise` (the
default) raises a RuntimeError at the start of the step, `kill` sends itself SIGKILL in the middle of the step
(after its forward and backward, while the others wait in a collective), `hang` sleeps for an hour at the
start of the step, `nospace` makes its checkpoint save at that step fail with ENOSPC (disk full) inside
torch.distributed.checkpoint's writer.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from planner.engine import run_precision
from planner.errors import InputError, MeshplanError

PROGRESS_PREFIX = "@meshplan-progress "
FAULT_ENV = "MESHPLAN_INJECT_FAULT"
DEFAULT_STEPS = 10
DEFAULT_SEED = 0
DEFAULT_LR = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="runtime.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True, help="Plan JSON file.")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="Optimizer steps to reach (counting resumed ones).")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Seed of the initial weights, data and dropout.")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="Learning rate (constant).")
    ap.add_argument("--data", default=None, help="Flat binary token file (default: synthetic tokens).")
    ap.add_argument("--data-dtype", default="uint16", choices=["uint16", "uint32"])
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="Save every K steps (0: never).")
    ap.add_argument("--resume", action="store_true", help="Continue from the newest intact checkpoint.")
    ap.add_argument("--resume-from", default=None, help="Continue from this checkpoint (chosen by meshplan run).")
    ap.add_argument("--force", action="store_true",
                    help="Without --resume: delete the checkpoints of an earlier run in --checkpoint-dir.")
    ap.add_argument("--report", default=None, help="Run-report JSON written by rank 0.")
    ap.add_argument("--job-dir", default=None, help="Directory for per-rank error files.")
    ap.add_argument("--progress-protocol", action="store_true", help="Machine-readable progress lines.")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block.")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _device():
    import torch
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return torch.device("cpu"), "gloo"


def _precision(plan, device):
    """(precision run, FSDP2 mixed-precision policy or None, autocast context factory, loss scaling).

    bf16 / fp16 (Megatron-style mixed precision): FSDP2's policy (16-bit parameters and compute, fp32
    gradient reduction) where ZeRO shards the model; otherwise autocast over fp32 parameters, which is the
    amp-bf16 recipe (amp-fp16 for fp16), and so what the run reports. On CPU everything runs fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision, cfg = plan.training.precision, plan.config
    if run_precision(precision, device.type) == "fp32":
        return "fp32", None, contextlib.nullcontext, False
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    if precision in ("bf16", "fp16") and cfg.zero >= 1 and cfg.dp > 1:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        return precision, policy, contextlib.nullcontext, precision == "fp16"
    ran = "amp-fp16" if precision == "fp16" else "amp-bf16"
    return ran, None, lambda: torch.autocast("cuda", dtype=dtype), precision == "fp16"


def make_optimizer(params, kind: str, lr: float):
    """The optimizer `kind` (a plan's training.optimizer) as the runtime trains with it and the profiler
    times it: SGD with momentum 0.9; Adam with betas (0.9, 0.95); AdamW with those and weight decay 0.1.
    Tensor-parallel DTensor parameters and plain ones (norms replicated without sequence parallelism) go in two
    parameter groups of the same settings: torch's foreach kernels (the default on CUDA) refuse to mix them."""
    import torch
    from torch.distributed.tensor import DTensor
    params = list(params)
    sharded = [p for p in params if isinstance(p, DTensor)]
    if sharded and len(sharded) < len(params):
        params = [{"params": sharded}, {"params": [p for p in params if not isinstance(p, DTensor)]}]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018): the loss is multiplied by `scale`; a step
    whose gradients hold inf/nan on any rank is skipped and the scale halved; 1000 clean steps double it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = 2.0 ** 16 if enabled else 1.0
        self.good = 0

    def unscale_and_check(self, params, device) -> bool:
        """Divide gradients by the scale; True when every rank's gradients are finite."""
        import torch
        import torch.distributed as dist
        if not self.enabled:
            return True
        bad = torch.zeros(1, device=device)
        for p in params:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.div_(self.scale)
                bad += (~torch.isfinite(g)).any().float()
        dist.all_reduce(bad)
        ok = bad.item() == 0
        if ok:
            self.good += 1
            if self.good % 1000 == 0:
                self.scale *= 2
        else:
            self.scale /= 2
            self.good = 0
        return ok


def run_plan(plan, args: argparse.Namespace, rank: int, device, resume_from=None, fingerprint: str = "",
             faults: dict[int, str] | None = None, on_step=None) -> tuple[list[float], dict, str]:
    """Train `plan` inside an initialised process group: build this rank's part of the model, run steps
    up to `args.steps` (from a checkpoint when `resume_from` = (step, path)), checkpoint as asked (a save
    that fails leaves the earlier checkpoints as they were, says so on rank 0's stderr and training goes on).

    Returns (the loss of every step, the same on every rank; this rank's measurements, with
    `checkpoint_failures` [{step, error}]; the precision run). `on_step(step, loss, seconds)` is called on
    every rank after each step. `faults`: {step: kind} of MESHPLAN_INJECT_FAULT for this rank."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from runtime import checkpoint as ckpt
    from runtime.data import TokenData
    from runtime.metrics import StepTimer
    from runtime.models import lm_loss
    from runtime.parallelize import (RankModel, TiedEmbeddingSync, build_chunks, build_mesh, my_coords,
                                     reduce_partial_grads)
    from runtime.pipeline import StepRunner
    from runtime.report import median_excluding_first

    cfg, tr = plan.config, plan.training
    mesh = build_mesh(plan, device.type)
    coords = my_coords(plan, rank)
    run_precision, mp_policy, autocast, scaled = _precision(plan, device)
    stages, chunks = build_chunks(plan, mesh, coords, device, args.seed, mp_policy, loss_parallel=cfg.tp > 1,
                                  compile_blocks=getattr(args, "compile", False))
    model = RankModel(chunks)
    tied = TiedEmbeddingSync(plan, coords, model)
    params = list(model.parameters())
    optimizer = make_optimizer(params, tr.optimizer, args.lr)
    scaler = LossScaler(scaled)

    def loss_fn(logits, targets):
        return lm_loss(logits, targets) * scaler.scale

    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(autocast())
        if cfg.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel
            stack.enter_context(loss_parallel())
        return stack

    runner = StepRunner(plan, mesh, stages, chunks, device, loss_fn=loss_fn, context=context)
    data = TokenData(args.seed, tr.global_batch, tr.seq_len, plan.model.vocab_size, args.data, args.data_dtype)

    losses: list[float] = []
    first_step = 1
    if resume_from is not None:
        step0, path = resume_from
        info = ckpt.load(path, model, optimizer, rank)
        losses = list(info.get("losses", []))[:step0]
        scaler.scale = info.get("loss_scale", scaler.scale)
        scaler.good = info.get("loss_scale_good_steps", 0)
        first_step = step0 + 1
    else:
        torch.manual_seed(args.seed * 100003 + 7919 * coords.dp + 31 * coords.pp)   # dropout stream

    timer = StepTimer(device)
    denom = cfg.num_microbatches * cfg.dp
    faults = faults or {}
    save_failures: list[dict] = []
    for step in range(first_step, args.steps + 1):
        fault = faults.get(step)
        if fault == "raise":
            raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_ENV})")
        if fault == "hang":
            time.sleep(3600)
        inputs, targets = data.local_batch(step, coords.dp, cfg.dp)
        x = torch.from_numpy(np.ascontiguousarray(inputs)).to(device)
        y = torch.from_numpy(np.ascontiguousarray(targets)).to(device)
        scale = scaler.scale
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        local = runner.step(x, y)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        tied()
        reduce_partial_grads(params)
        if scaler.unscale_and_check(params, device):
            optimizer.step()
        # the step's loss: mean over all micro-batches of all data-parallel ranks (one TP rank each)
        contrib = local if (runner.holds_last and coords.tp == 0) else 0.0
        total = torch.tensor([contrib], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        dt = timer.stop()
        loss = total.item() / denom / scale
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss, dt)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            _, why = ckpt.save(args.checkpoint_dir, step, model, optimizer,
                               {"step": step, "losses": losses, "fingerprint": fingerprint, "seed": args.seed,
                                "loss_scale": scaler.scale, "loss_scale_good_steps": scaler.good,
                                "plan": os.path.abspath(args.plan) if getattr(args, "plan", None) else None},
                               rank, fail_with=errno.ENOSPC if fault == "nospace" else None)
            if why:
                save_failures.append({"step": step, "error": why})
                if rank == 0:
                    print(f"warning: {why}", file=sys.stderr, flush=True)
    mine = {"rank": rank, "pp": coords.pp, "dp": coords.dp, "tp": coords.tp,
            "step_times_s": timer.times, "step_time_s": median_excluding_first(timer.times),
            "checkpoint_failures": save_failures}
    return losses, mine, run_precision


def train(args: argparse.Namespace) -> int:
    """The whole life of one rank: checks (before torch is even imported), process group, training,
    report."""
    from planner.plan import load_plan
    from runtime import checkpoint as ckpt
    from runtime.checks import check_run

    plan = load_plan(args.plan)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_run(plan, world, args)
    fp = ckpt.fingerprint(plan, args.seed, args.lr, args.data)
    resume_from = None
    if args.resume_from:        # chosen and verified by `meshplan run`
        resume_from = ckpt.check_checkpoint(Path(args.resume_from), fp, args.steps, verify_contents=False)
    elif args.resume:
        resume_from, skipped = ckpt.check_resumable(args.checkpoint_dir, fp, args.steps)
        for line in skipped if rank == 0 else ():
            print(f"warning: {line}", file=sys.stderr, flush=True)
    faults = _faults(rank)
    if args.force and args.checkpoint_every and not args.resume and rank == 0:
        ckpt.clear(args.checkpoint_dir)          # before any rank can save (saves follow collectives)

    import torch
    import torch.distributed as dist

    from runtime.metrics import MemoryMeter
    from runtime.report import build_report

    device, backend = _device()
    meter = MemoryMeter(device)
    started = time.time()
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    # the distributed modules the run uses are imported before the baseline, so that on CPU the RSS
    # increase counts tensors and buffers rather than Python modules
    import torch._dynamo  # noqa: F401  (DTensor construction imports it anyway)
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401
    meter.baseline()

    def on_step(step, loss, dt):
        if rank == 0:
            _progress(args, step, loss, dt)

    losses, mine, run_precision = run_plan(plan, args, rank, device, resume_from, fp, faults, on_step)
    mine.update(meter.read())
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        run = {"steps": args.steps, "first_step": 1,
               "resumed_from_step": resume_from[0] if resume_from else None,
               "timed_steps": max(0, len(mine["step_times_s"]) - 1), "seed": args.seed, "lr": args.lr,
               "optimizer": plan.training.optimizer,
               "data": os.path.abspath(args.data) if args.data else "synthetic",
               "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
               "backend": backend, "world_size": world, "precision_plan": plan.training.precision,
               "precision_run": run_precision, "compiled": bool(getattr(args, "compile", False)), "torch": torch.__version__, "wall_s": time.time() - started,
               "checkpoint_failures": mine["checkpoint_failures"]}
        report = build_report(plan, run, losses, sorted(gathered, key=lambda r: r["rank"]))
        if args.report:
            tmp = Path(args.report + ".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, args.report)
        if not args.progress_protocol:
            from rich.console import Console

            from runtime.report import render_report
            render_report(Console(highlight=False), report)
    dist.barrier()                   # every rank is done and the report is written: leave without any teardown
    return 0


FAULT_KINDS = ("raise", "kill", "hang", "nospace")


def _faults(rank: int) -> dict[int, str]:
    """{step: kind} of the failures MESHPLAN_INJECT_FAULT asks of this rank."""
    spec = os.environ.get(FAULT_ENV)
    out: dict[int, str] = {}
    for item in filter(None, (spec or "").split(",")):
        parts = item.strip().split(":")
        try:
            r, s = int(parts[0]), int(parts[1])
            kind = parts[2] if len(parts) > 2 else "raise"
        except (ValueError, IndexError):
            raise InputError(f"'{item}' is not RANK:STEP[:KIND]", field=FAULT_ENV) from None
        if kind not in FAULT_KINDS or len(parts) > 3:
            raise InputError(f"'{item}': the kind must be one of {', '.join(FAULT_KINDS)}", field=FAULT_ENV)
        if r == rank:
            out[s] = kind
    return out


def _progress(args, step: int, loss: float, dt: float) -> None:
    if args.progress_protocol:
        print(PROGRESS_PREFIX + json.dumps({"step": step, "steps": args.steps, "loss": loss, "step_time_s": dt}),
              flush=True)
    else:
        print(f"step {step}/{args.steps}  loss {loss:.5f}  {dt * 1e3:.0f} ms", flush=True)


def _write_error(job_dir: str | None, rank: int, kind: str, message: str) -> None:
    """job-dir/errors/rank<R>.json, durably: a temporary file, fsync, rename, fsync of the directory."""
    if not job_dir:
        return
    try:
        d = Path(job_dir) / "errors"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".rank{rank}.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"rank": rank, "kind": kind, "message": message, "time": time.time()}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"rank{rank}.json")
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# what a collective raises when a peer process went away (gloo's TCP transport, NCCL's abort, a timeout)
PEER_FAILURE = re.compile(r"gloo/transport|[Cc]onnection (reset|closed|refused)|Broken pipe|[Rr]emote process "
                          r"exited|NCCL communicator was aborted|[Ww]atchdog|Timed out waiting")


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist
    errors = tuple(getattr(dist, name) for name in ("DistNetworkError", "DistStoreError") if hasattr(dist, name))
    return isinstance(exc, errors) or bool(PEER_FAILURE.search(str(exc)))


def _leave(code: int) -> None:
    """Exit now: flush what was printed and skip the interpreter's teardown. After a failure, destructors of
    process groups whose peers are gone can abort the process; after success too, gloo's teardown now and then
    aborts a rank ("terminate called without an active exception", seen in CI after an expert-parallel run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    from runtime.process import die_with_parent
    die_with_parent(signal.SIGKILL)          # torchrun started us in a session of our own
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        rc = train(args)
    except MeshplanError as exc:
        _write_error(args.job_dir, rank, "input", str(exc))
        print(f"error: {exc}", file=sys.stderr, flush=True)
        _leave(exc.exit_code)
    except SystemExit:
        raise
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        _write_error(args.job_dir, rank, "peer" if "torch" in sys.modules and _is_peer_failure(exc) else "crash",
                     message)
        traceback.print_exc()
        _leave(1)
    _leave(rc)


if __name__ == "__main__":
    main()
