"""The host's cost of issuing eager PyTorch's kernels, measured on the runtime's own blocks.

Eager PyTorch spends host time on every op it runs: Python, the module call, the dispatcher, autograd's graph
and, on a GPU, the launch. Where the host sets a pass's pace (small blocks, short micro-batches, and always on a
CPU, which runs the ops it issues) that time is the step. The engine files carry a figure fitted on one H200
host (cluster_specs/engines/meshplan.yaml, `host`); this measures the figure of the host at hand.

The runtime's gpt-tiny and llama-tiny blocks run on a handful of tokens, so that every op takes the device less
time than the host takes to issue it. The seconds of a forward and of a backward per block, divided by the
kernels the cost model counts for that block (planner/cost/kernels.py, `block_work`), are the host seconds per
forward and per backward kernel, fitted through the origin over the two blocks. On a device that runs its own
ops (a CPU) each op's own shortest time, `kernel_overhead_s`, is taken off: the cost model adds it to the host's.
"""

from __future__ import annotations

import statistics
import time

import torch

from profiler.devices import DTYPES, main_dtype

BLOCKS = ("gpt-tiny", "llama-tiny")   # presets whose blocks the runtime builds (runtime/models.py)
TOKENS, LAYERS, STEPS, WARMUP = 8, 8, 20, 5
OPTIMIZER_TENSORS, OPTIMIZER_ELEMENTS = (16, 64), 64   # tensors of the two timed optimizer steps; elements each


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_pass_seconds(name: str, device: torch.device, prepare=None, steps: int = STEPS,
                       warmup: int = WARMUP, recompute: str = "none") -> tuple[float, float]:
    """Median (forward, backward) seconds per block of a chunk of LAYERS blocks of preset `name` on TOKENS tokens:
    the forward as long as the host takes to issue it, the backward until the device is done. `prepare(chunk)`
    parallelises the chunk first (scripts/measure_tp_host.py: DTensor TP); `recompute`: the blocks' mode."""
    from planner.presets import PRESETS
    from runtime.models import ModelChunk
    spec = PRESETS[name].model_copy(update={"num_layers": LAYERS})
    torch.manual_seed(0)
    dtype = DTYPES[main_dtype(device)]
    chunk = ModelChunk(spec, list(range(LAYERS)), first=False, last=False, recompute=recompute).to(
        device=device, dtype=dtype)
    if prepare is not None:
        prepare(chunk)
    x = torch.randn(1, TOKENS, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
    fwd, bwd = [], []
    for i in range(steps + warmup):
        _sync(device)
        t0 = time.perf_counter()
        y = chunk(x)
        t1 = time.perf_counter()
        y.float().sum().backward()
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd) / LAYERS, statistics.median(bwd) / LAYERS


def kernels_per_block(name: str, device: torch.device) -> tuple[int, int]:
    """(forward, backward) kernels the cost model counts for one block of preset `name` under the meshplan engine."""
    from planner.cost.kernels import Dtypes, KernelOptions, block_work
    from planner.engine import load_engine
    from planner.presets import PRESETS
    work = block_work(PRESETS[name], 1, TOKENS, 1, False, "none", Dtypes.of(main_dtype(device)),
                      KernelOptions.of(load_engine("meshplan")))
    return len(work.forward.kernels), len(work.backward.kernels)


def fit_per_kernel(rows: list[tuple[float, int]], overhead_s: float) -> float:
    """Seconds per kernel through the origin over (seconds per block, kernels per block), less `overhead_s`."""
    per = sum(t * n for t, n in rows) / sum(n * n for _, n in rows)
    return max(0.0, per - overhead_s)


def optimizer_step_seconds(device: torch.device, tensors: int, dtensor: bool, steps: int = STEPS,
                           warmup: int = WARMUP) -> float:
    """Median seconds of the runtime's AdamW step (runtime/train.py `make_optimizer`) over `tensors` parameter
    tensors of OPTIMIZER_ELEMENTS each: plain tensors, or DTensors sharded over the default group's ranks (as
    FSDP2 holds them; elementwise steps need no communication)."""
    from runtime.train import make_optimizer
    dtype = DTYPES[main_dtype(device)] if device.type == "cuda" else torch.float32
    if dtensor:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        wrap = lambda t: DTensor.from_local(t, mesh, [Shard(0)], run_check=False)   # noqa: E731
    else:
        wrap = lambda t: t                                                          # noqa: E731
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(wrap(torch.randn(OPTIMIZER_ELEMENTS, device=device, dtype=dtype)))
        p.grad = wrap(torch.randn(OPTIMIZER_ELEMENTS, device=device, dtype=dtype))
        params.append(p)
    opt = make_optimizer(params, "adamw", 1e-4)
    times = []
    for i in range(steps + warmup):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_optimizer_host(device: torch.device) -> dict:
    """Host seconds of the optimizer step per plain and per DTensor parameter tensor: the slope of the step's
    time between OPTIMIZER_TENSORS[0] and [1] tiny tensors (their arithmetic is negligible; what stays is the
    per-tensor loop on a CPU, the foreach kernels' list handling on CUDA, and DTensor's dispatch). DTensor
    parameters need the process group of `meshplan profile cluster` (absent: only the plain figure)."""
    import torch.distributed as dist
    few, many = OPTIMIZER_TENSORS
    out = {}
    for key, dtensor in (("optimizer_per_tensor_s", False), ("optimizer_per_dtensor_s", True)):
        if dtensor and not dist.is_initialized():
            continue
        t_few, t_many = (optimizer_step_seconds(device, n, dtensor) for n in (few, many))
        out[key] = max(0.0, (t_many - t_few) / (many - few))
    return out


def fit_checkpoint(blocks: dict, per_kernel_s: float, overhead_s: float) -> dict:
    """What full recomputation (torch.utils.checkpoint of each block, as the runtime runs it) costs the host, from
    the blocks timed with and without it: the forward's extra seconds per block (the mean,
    `checkpoint_forward_s`), and the backward's extra seconds, the replay, through the origin over the blocks'
    forward kernels, per replayed kernel as a multiple of a forward kernel's host seconds
    (`recompute_kernel_factor`; on a device that runs its own ops each replayed op's own `overhead_s` taken off)."""
    rows = [(b["checkpointed_forward_s"] - b["forward_s"], b["checkpointed_backward_s"] - b["backward_s"],
             b["forward_kernels"]) for b in blocks.values()]
    if per_kernel_s <= 0 or not rows:
        return {}
    entry = statistics.mean(f for f, _, _ in rows)                             # per block
    replay = sum(b * n for _, b, n in rows) / sum(n * n for *_, n in rows)    # per replayed kernel
    return {"checkpoint_forward_s": max(0.0, entry),
            "recompute_kernel_factor": max(0.0, (replay - overhead_s) / per_kernel_s)}


def measure_host(device: torch.device, kernel_overhead_s: float) -> dict:
    """Host seconds per forward and per backward kernel of eager PyTorch on this host and device, with the
    measured blocks, what checkpointing them costs (`fit_checkpoint`), and the optimizer step's per parameter
    tensor (`measure_optimizer_host`). `kernel_overhead_s`: the device's shortest op, taken off where the device
    runs its own ops."""
    own_ops = device.type != "cuda"
    blocks, fwd_rows, bwd_rows = {}, [], []
    block_pass_seconds(BLOCKS[0], device)       # the first blocks built and run in this process run slower
    for name in BLOCKS:
        f, b = block_pass_seconds(name, device)
        cf, cb = block_pass_seconds(name, device, recompute="full")
        nf, nb = kernels_per_block(name, device)
        blocks[name] = {"forward_s": f, "backward_s": b, "forward_kernels": nf, "backward_kernels": nb,
                        "checkpointed_forward_s": cf, "checkpointed_backward_s": cb}
        fwd_rows.append((f, nf))
        bwd_rows.append((b, nb))
    overhead = kernel_overhead_s if own_ops else 0.0
    per_kernel = fit_per_kernel(fwd_rows, overhead)
    return {"per_kernel_s": per_kernel, "per_backward_kernel_s": fit_per_kernel(bwd_rows, overhead),
            **fit_checkpoint(blocks, per_kernel, overhead), **measure_optimizer_host(device), "blocks": blocks}
