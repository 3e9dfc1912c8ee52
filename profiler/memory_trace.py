"""The bytes a training step holds over time, by category, counted from the runtime's actual tensors on CPU.

`trace_step_memory(plan)` runs one or more training steps of `plan` on this rank with the runtime's own
code (`runtime.parallelize.build_chunks`, `runtime.pipeline.StepRunner`, `runtime.train.make_optimizer`,
`LossScaler` and the precision recipe of `runtime.train._precision`), and reports per phase (model build;
forward and backward of each micro-batch on each stage; the pipeline's gradient reduction; the optimizer
step; zero_grad) the live tensor bytes at the phase's peak and at its end, split into:

  parameters        the parameters as the optimizer holds them (sharded fp32 under FSDP2, padding included)
  parameter_copies  unsharded (all-gathered) FSDP2 parameters and 16-bit casts of parameters (FSDP2's
                    mixed-precision all-gather input, autocast's weight cache)
  buffers           module buffers (RoPE tables, the eager kernel's causal mask)
  gradients         the gradients the optimizer reads (`param.grad` of the stored parameters; under FSDP2
                    the flat reduce-scatter outputs they are views of)
  gradient_buffers  unsharded gradients before their reduction, and FSDP2's unsharded accumulated gradients
  optimizer_states  every tensor in `optimizer.state` (Adam's exp_avg, exp_avg_sq and 4-byte step)
  pipeline_buffers  a pipeline stage's receive buffers for activations and gradients (one per micro-batch,
                    allocated at its first step and kept) and the output each in-flight micro-batch keeps for
                    its backward (`fwd_cache`; on the last stage, the logits)
  saved_activations tensors autograd saves for backward (`saved_tensors_hooks`), and under activation
                    checkpointing the tensors the recomputation rebuilds for backward
  temporaries       everything else alive: logits and loss buffers, activation gradients, FSDP2's flat
                    all-gather and reduce-scatter buffers, the optimizer's intermediates, token ids no op saves

A storage with several roles gets the first in this order (`profiler.storage_ledger.CATEGORIES`). Each phase record names its five largest
temporaries (bytes, dtype, shape, the op and module that made them).

Bytes are counted by `profiler.storage_ledger.StorageLedger` (exact storage bytes, see there); the
categories are decided from the model, FSDP2's parameter records, the pipeline stages and the optimizer at
every phase boundary, and hold for a storage's whole lifetime, so a gradient counts as a gradient from its
creation.

What torch 2.13's Adam and AdamW allocate as temporaries (read from `torch/optim/adam.py`; AdamW is Adam
with `decoupled_weight_decay=True`; the runtime's Adam has weight decay 0, its AdamW 0.1):
  * Which implementation: with neither `foreach` nor `fused` given, `_default_to_fused_or_foreach` picks
    foreach when every parameter is a plain tensor, Parameter or DTensor on a device in
    `_get_foreach_kernels_supported_devices()` = cuda, xpu, mtia, privateuse1: foreach on CUDA, the
    for-loop `_single_tensor_adam` on CPU. Fused is never the default.
  * foreach (`_multi_tensor_adam`), per (device, dtype) group of parameters: `_foreach_sqrt(exp_avg_sqs)`
    allocates one tensor per parameter, alive until the group's `_foreach_addcdiv_`: 4 bytes per fp32
    parameter of the group, i.e. on one GPU holding fp32 parameters the size of all its (sharded)
    parameters. Adam with weight decay (not the runtime's) first makes `_foreach_add(grads, params)`, as
    large, but deletes it before the sqrt, so the peak is the same.
  * for-loop (`_single_tensor_adam`), per parameter i: `(exp_avg_sq.sqrt() / bias_correction2_sqrt)`
    holds two tensors of parameter i's size while `denom` still holds parameter i-1's, so the peak is
    max over i of (2 s_i + s_(i-1)) in the optimizer's parameter order (s: bytes); Adam with weight decay
    adds `grad.add(param)`, one more s_i.
  * SGD with momentum (for-loop or foreach): no temporaries; its state is one momentum buffer per parameter.
  * fused (`_fused_adam_`/`_fused_adamw_`): no parameter-sized temporaries.
  * state: exp_avg and exp_avg_sq like the (sharded) parameter, and `step`, a 4-byte fp32 scalar on the
    CPU (on the device only with capturable or fused).
The tests (tests/test_memory_trace.py) check these counts against the traced optimizer step.

Limitations: CPU only (what runs on CUDA differs in allocator rounding and cuDNN/cuBLAS workspaces, not in
tensors); fp16 is not traced (bf16 recipes are: `cuda_precision=True` traces the recipe the runtime picks on
CUDA, with autocast on the CPU). Uses FSDP2's private parameter records (`_fsdp_param_groups`,
`all_gather_outputs`) and the pipeline schedule's stages (`_stage`, `_stages`) to name roles and phases.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from profiler.storage_ledger import StorageLedger

# ----------------------------------------------------------------------------------------------
# One rank's training steps under the ledger
# ----------------------------------------------------------------------------------------------
def _fsdp_params(chunks) -> list:
    """FSDP2's per-parameter records (`FSDPParam`) of every fully_shard / replicate module in `chunks`."""
    from torch.distributed.fsdp import FSDPModule
    out = []
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, FSDPModule):
                for group in m._get_fsdp_state()._fsdp_param_groups:
                    out.extend(group.fsdp_params)
    return out


class _Roles:
    """Assigns categories from what the rank holds: its stored parameters and their gradients, module
    buffers, FSDP2's unsharded parameters and gradients, the optimizer's state."""

    def __init__(self, ledger: StorageLedger, model: torch.nn.Module, chunks, optimizer, pipeline_stages):
        self.ledger = ledger
        self.pipeline_stages = pipeline_stages
        self.model = model
        self.params = list(model.parameters())
        self.stored = {id(p) for p in self.params}
        self.fsdp = _fsdp_params(chunks)
        self.optimizer = optimizer
        self._hooked: set[int] = set()
        for name, module in model.named_modules():
            ledger.module_names[module] = name or "model"

    def scan(self) -> None:
        led = self.ledger
        for p in self.params:
            led.assign(p, "parameters")
            led.assign(p.grad, "gradients")
        for b in self.model.buffers():
            led.assign(b, "buffers")
        for fp in self.fsdp:
            for t in fp.all_gather_outputs:
                led.assign(t, "parameter_copies")
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                led.assign(unsharded, "parameter_copies")
                led.assign(unsharded.grad, "gradient_buffers")
            led.assign(fp.unsharded_accumulated_grad, "gradient_buffers")
        for state in self.optimizer.state.values():
            for v in state.values():
                led.assign(v, "optimizer_states")
        for stage in self.pipeline_stages:
            for infos in list(stage.args_recv_info.values()) + list(stage.grad_recv_info.values()):
                for info in infos:
                    led.assign(info.buffer, "pipeline_buffers")
            for outputs, _inputs in stage.fwd_cache.values():
                for t in outputs:
                    led.assign(t, "pipeline_buffers")

    def hook_module_params(self, module, _args) -> None:
        """Before a module's forward: watch the gradients accumulated into the parameters it computes with
        (FSDP2's unsharded ones are not the stored parameters)."""
        for p in module._parameters.values():
            if p is None or not p.requires_grad or id(p) in self._hooked:
                continue
            self._hooked.add(id(p))
            kind = "gradients" if id(p) in self.stored else "gradient_buffers"
            p.register_post_accumulate_grad_hook(lambda q, kind=kind: self.ledger.assign(q.grad, kind))


def precision_recipe(plan, cuda_precision: bool):
    """(precision run, FSDP2 mixed-precision policy or None, autocast context factory, loss scaling) as
    `runtime.train._precision` chooses them on CPU, or with `cuda_precision` as it chooses them on CUDA
    (its autocast run on the CPU device)."""
    from runtime.train import _precision
    if not cuda_precision:
        return _precision(plan, torch.device("cpu"))
    ran, policy, _, scaled = _precision(plan, torch.device("cuda"))
    if ran.startswith("amp-"):
        dtype = torch.float16 if ran == "amp-fp16" else torch.bfloat16
        return ran, policy, lambda: torch.autocast("cpu", dtype=dtype), scaled
    return ran, policy, contextlib.nullcontext, scaled


def optimizer_implementation(optimizer) -> str:
    """'fused', 'foreach' or 'for-loop': what `torch.optim.Adam(W)/SGD.step` runs for the first group."""
    from torch.optim.optimizer import _default_to_fused_or_foreach
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    foreach = group.get("foreach")
    if foreach is None:
        foreach = _default_to_fused_or_foreach(group["params"], False, use_fused=False)[1]
    return "foreach" if foreach else "for-loop"


def trace_step_memory(plan, steps: int = 2, foreach: bool | None = None, cuda_precision: bool = True,
                      seed: int = 0, lr: float | None = None) -> dict:
    """Train `steps` steps of `plan` on this rank (inside an initialised gloo process group whose world is
    the plan's) with the runtime's code, on CPU, counting live tensor bytes. The step body is
    `runtime.train.run_plan`'s (zero_grad, StepRunner.step, tied-embedding sync, loss scaler, optimizer
    step, loss all-reduce), with zero_grad moved to the step's end, where it frees the same tensors.

    `foreach`: None keeps the optimizer's default (the for-loop on CPU), True/False forces it.
    `cuda_precision`: trace the precision recipe the runtime runs on CUDA (bf16 plans: FSDP2's
    MixedPrecisionPolicy or autocast) instead of the fp32 it runs on CPU.

    Returns {'rank', 'coords', 'precision_run', 'optimizer', 'optimizer_impl', 'losses' (per step),
    'records': [per phase, see `StorageLedger.timeline`], 'step_peaks': [per step: the largest phase peak,
    its phase, stage, micro-batch and bytes by category]}; bytes throughout.
    """
    import numpy as np
    import torch.distributed as dist

    from runtime.data import TokenData
    from runtime.models import lm_loss
    from runtime.parallelize import RankModel, TiedEmbeddingSync, build_chunks, build_mesh, my_coords
    from runtime.pipeline import StepRunner
    from runtime.train import DEFAULT_LR, LossScaler, make_optimizer

    cfg, tr = plan.config, plan.training
    device = torch.device("cpu")
    rank = dist.get_rank()
    mesh = build_mesh(plan, device.type)
    coords = my_coords(plan, rank)
    ran, policy, autocast, scaled = precision_recipe(plan, cuda_precision)
    torch.manual_seed(seed * 100003 + 7919 * coords.dp + 31 * coords.pp)     # as runtime.train.run_plan
    ledger = StorageLedger()
    where = {"step": None, "fwd": {}, "bwd": {}}
    losses = []
    with ledger:
        ledger.begin("build")
        stages, chunks = build_chunks(plan, mesh, coords, device, seed, policy, loss_parallel=cfg.tp > 1)
        model = RankModel(chunks)
        tied = TiedEmbeddingSync(plan, coords, model)
        params = list(model.parameters())
        optimizer = make_optimizer(params, tr.optimizer, DEFAULT_LR if lr is None else lr)
        if foreach is not None:
            for group in optimizer.param_groups:
                group["foreach"] = foreach
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
        roles = _Roles(ledger, model, chunks, optimizer, pipeline_stages(runner))
        ledger.before_phase = roles.scan
        watch = torch.nn.modules.module.register_module_forward_pre_hook(roles.hook_module_params)
        _mark_phases(ledger, runner, chunks, stages, optimizer, where)
        data = TokenData(seed, tr.global_batch, tr.seq_len, plan.model.vocab_size)
        try:
            for step in range(1, steps + 1):
                where.update(step=step, fwd={}, bwd={})
                ledger.begin("step_start", step)
                inputs, targets = data.local_batch(step, coords.dp, cfg.dp)
                x = torch.from_numpy(np.ascontiguousarray(inputs))
                y = torch.from_numpy(np.ascontiguousarray(targets))
                scale = scaler.scale
                local = runner.step(x, y)
                tied()
                if scaler.unscale_and_check(params, device):
                    optimizer.step()
                contrib = local if (runner.holds_last and coords.tp == 0) else 0.0
                total = torch.tensor([contrib], dtype=torch.float64)
                dist.all_reduce(total)
                losses.append(total.item() / (cfg.num_microbatches * cfg.dp) / scale)
                del x, y, total
                optimizer.zero_grad(set_to_none=True)
        finally:
            watch.remove()
        ledger.begin("end", steps)
    records = ledger.timeline()[:-1]
    return {"rank": rank, "coords": {"pp": coords.pp, "dp": coords.dp, "tp": coords.tp}, "precision_run": ran,
            "optimizer": tr.optimizer, "optimizer_impl": optimizer_implementation(optimizer), "losses": losses,
            "records": records, "step_peaks": step_peaks(records)}


def _mark_phases(ledger: StorageLedger, runner, chunks, stages: list[int], optimizer, where: dict) -> None:
    """Start a phase at each micro-batch's forward and backward, the pipeline's gradient reduction, the
    optimizer step and after it (zero_grad)."""
    def begin(name, stage=None, mb=None):
        ledger.begin(name, where["step"], stage, mb)

    if runner.schedule is None:
        stage = stages[0]

        def forward_pre(_module, _args):
            mb = where["fwd"][stage] = where["fwd"].get(stage, -1) + 1
            begin("forward", stage, mb)

        def backward(_gid):
            mb = where["bwd"][stage] = where["bwd"].get(stage, -1) + 1
            begin("backward", stage, mb)

        chunks[0].register_forward_pre_hook(forward_pre, prepend=True)
        ledger.on_backward = backward
    for pstage in pipeline_stages(runner):
        _wrap_stage(pstage, begin)
    optimizer.register_step_pre_hook(lambda *_: begin("optimizer"))
    optimizer.register_step_post_hook(lambda *_: begin("zero_grad"))


def pipeline_stages(runner) -> list:
    """The `PipelineStage`s of a StepRunner's schedule (none without pipelining)."""
    sched = runner.schedule
    if sched is None:
        return []
    return list(getattr(sched, "_stages", None) or [sched._stage])


def _wrap_stage(pstage, begin) -> None:
    """Phase markers around a pipeline stage's per-micro-batch forward and backward and its gradient
    reduction (instance attributes, which the schedule's calls find first)."""
    fwd, bwd, reduce = pstage.forward_one_chunk, pstage.backward_one_chunk, pstage.perform_reduce_grad
    index = pstage.stage_index

    def forward_one_chunk(chunk_id, *args, **kwargs):
        begin("forward", index, chunk_id)
        return fwd(chunk_id, *args, **kwargs)

    def backward_one_chunk(chunk_id, *args, **kwargs):
        begin("backward", index, chunk_id)
        return bwd(chunk_id, *args, **kwargs)

    def perform_reduce_grad(*args, **kwargs):
        begin("grad_reduce", index)
        return reduce(*args, **kwargs)

    pstage.forward_one_chunk = forward_one_chunk
    pstage.backward_one_chunk = backward_one_chunk
    pstage.perform_reduce_grad = perform_reduce_grad


def step_peaks(records: list[dict]) -> list[dict]:
    """Per step: the phase record with the most live bytes at its peak (the step's peak)."""
    out = []
    for step in sorted({r["step"] for r in records if r["step"] is not None}):
        best = max((r for r in records if r["step"] == step), key=lambda r: r["peak_bytes"])
        out.append({"step": step, "peak_bytes": best["peak_bytes"], "phase": best["phase"], "stage": best["stage"],
                    "microbatch": best["microbatch"], "by_category": best["by_category"]})
    return out


# ----------------------------------------------------------------------------------------------
# Running traces: one process, or several configurations in one launch of N processes
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_group():
    """A gloo process group of world size 1 in this process (in-memory store), for one-rank plans."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def trace_in_process(plan, **options) -> dict:
    """`trace_step_memory` of a one-rank plan in this process."""
    if plan.world_size != 1:
        raise ValueError(f"trace_in_process runs one-rank plans; this plan has {plan.world_size} ranks "
                         "(use launch_traces)")
    with single_process_group():
        return trace_step_memory(plan, **options)


def launch_traces(jobs: list[dict], nproc: int, timeout_s: float = 600.0) -> dict[str, list[dict]]:
    """Trace several configurations in one launch of `nproc` gloo processes (one import of torch each).

    A job: {'name', 'plan' (a `planner.plan.Plan` of world size `nproc`), and any options of
    `trace_step_memory` (steps, foreach, cuda_precision, seed, lr)}. Returns {name: [the result of each
    rank, by rank]}. Raises RuntimeError naming the failed rank (with its traceback) or TimeoutError."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    for job in jobs:
        if job["plan"].world_size != nproc:
            raise ValueError(f"job {job['name']!r}: its plan has {job['plan'].world_size} ranks, not {nproc}")
    payload = [{**{k: v for k, v in job.items() if k != "plan"}, "plan": job["plan"].model_dump_json()}
               for job in jobs]
    with tempfile.TemporaryDirectory(prefix="memtrace-") as tmp:
        out = Path(tmp)
        ctx = mp.spawn(_launched_rank, args=(nproc, json.dumps(payload), str(out)), nprocs=nproc, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"memory traces did not finish within {timeout_s:.0f} s")
        except ProcessException as exc:
            raise RuntimeError(f"memory trace failed: {exc}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {job["name"]: [results[r][job["name"]] for r in range(nproc)] for job in jobs}


def _launched_rank(rank: int, nproc: int, payload: str, out_dir: str) -> None:
    """One process of `launch_traces`: join the group, trace every job, write rank<R>.json."""
    import torch.distributed as dist

    from planner.plan import Plan

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=nproc)
    try:
        results = {}
        for job in json.loads(payload):
            options = {k: v for k, v in job.items() if k not in ("name", "plan")}
            results[job["name"]] = trace_step_memory(Plan.model_validate_json(job["plan"]), **options)
            dist.barrier()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
