"""Host seconds FSDP2's hooks add to each wrapped block per pass: the fixed part and the part per parameter tensor.

FSDP2 (`fully_shard` per block, as `meshplan run` and torchtitan wrap a model) runs Python hooks around every
wrapped block: before its forward (all-gather: copy-in, collective, copy-out into the unsharded parameters),
after it (reshard), before its backward and after it (reduce-scatter: copy-in, collective, the sharded gradient).
On a GPU they issue work asynchronously; what the host spends on them delays the kernels behind them, which
matters when the host, not the device, sets a pass's pace (small models, short micro-batches).

This times blocks of K bias-free Linear(32, 32) layers on one CPU process (gloo, world size 1: the collectives
are trivial, what remains is the hooks' own work) with and without `fully_shard`, for two values of K, and fits
seconds = fixed + per_tensor * K per block and pass (forward; backward). The result is this CPU's; a GPU host
also records events and waits on streams, so it reads as a lower bound there: `--device cuda` times the same on one GPU
with NCCL (scripts/gpu_check.sh). Output: the `host.fsdp_hooks` block of cluster_specs/engines/{meshplan,torchtitan}.yaml.

    python scripts/measure_fsdp_host.py            # median of 5 repetitions
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

WIDTH, BLOCKS, STEPS, WARMUP = 32, 24, 50, 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pass_seconds(tensors: int, wrapper: str | None, device: str) -> tuple[float, float]:
    """Median (forward, backward) seconds per block of BLOCKS blocks of `tensors` Linear layers each, every block
    and then the whole wrapped by `wrapper` (None: plain modules)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(tensors)])
                            for _ in range(BLOCKS)]).to(device)
    if wrapper == "replicated":            # meshplan's ZeRO 0 (runtime/parallelize.py)
        for block in model:
            replicate(block)
        replicate(model)
    elif wrapper is not None:
        for block in model:
            fully_shard(block, reshard_after_forward=(wrapper == "resharded"))
        fully_shard(model, reshard_after_forward=False)
    x = torch.randn(4, WIDTH, device=device)
    fwd, bwd = [], []
    for i in range(STEPS + WARMUP):
        if device == "cuda":        # the host's time only: the device idles on these tiny kernels
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(x).sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= WARMUP:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd) / BLOCKS, statistics.median(bwd) / BLOCKS


def hook_seconds(tensors: int, wrapper: str, device: str) -> tuple[float, float]:
    """(forward, backward) seconds per block that wrapping adds."""
    plain, wrapped = pass_seconds(tensors, None, device), pass_seconds(tensors, wrapper, device)
    return wrapped[0] - plain[0], wrapped[1] - plain[1]


def _cpu() -> str:
    """This machine's CPU model, for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: one GPU with NCCL, the host cost as a GPU host pays it (scripts/gpu_check.sh)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    few, many = 2, 9            # a GPT block has 4 weight matrices (+ biases, norms); a Llama block 7 + 2 norms
    print(f"fsdp_hooks:                 # scripts/measure_fsdp_host.py --device {args.device} "
          f"(median of {args.repeats}, {_cpu()})")
    for wrapper in ("resharded", "kept", "replicated"):
        runs = [(hook_seconds(few, wrapper, args.device), hook_seconds(many, wrapper, args.device))
                for _ in range(args.repeats)]
        fits = []
        for phase in (0, 1):
            lo = statistics.median(r[0][phase] for r in runs)
            hi = statistics.median(r[1][phase] for r in runs)
            per_tensor = (hi - lo) / (many - few)
            fits.append((lo - per_tensor * few, per_tensor))
        (f0, f1), (b0, b1) = fits
        print(f"  {wrapper}: {{forward_s: {f0:.3g}, per_tensor_forward_s: {f1:.3g}, "
              f"backward_s: {b0:.3g}, per_tensor_backward_s: {b1:.3g}}}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
