"""Time and activation bytes of one model piece (a transformer block, the embedding, the LM head with its
loss) and of the optimizer step, measured on this process's device with the runtime's own modules
(`runtime.models`), so what is profiled is what runs.

* Time: forward and backward separately (backward includes any recomputation), after warm-up, the median
  of several repetitions; CUDA events on GPU, `time.perf_counter` on CPU.
* Activation bytes: every tensor autograd saves for backward during one forward, seen through
  `torch.autograd.graph.saved_tensors_hooks`, counted once per storage (its `untyped_storage()` address)
  at the storage's full size, excluding the storages of the module's parameters and buffers (weights,
  RoPE tables, causal masks), which are not activations. The same count on CPU and GPU. On CUDA the
  allocator's growth across the forward (minus the output) is recorded as a cross-check.
* Precision recipes (`planner.cost.kernels.Dtypes`): fp32 runs in fp32; bf16 / fp16 cast the module and
  its input to the 16-bit type (Megatron-style, and FSDP2's param_dtype); amp-bf16 runs fp32 parameters
  under `torch.autocast` in bf16.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from planner.specs import ModelSpec

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PieceResult:
    """Seconds per micro-batch and bytes kept for backward of one piece at one shape."""

    forward_s: float
    backward_s: float
    activation_bytes: int
    allocator_activation_bytes: int | None = None


def _prepare(module: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    module = module.to(device)
    if precision in HALF:
        module = module.to(HALF[precision])
    module.train()
    return module


def _autocast(precision: str, device: torch.device):
    if precision == "amp-bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _act_dtype(precision: str) -> torch.dtype:
    return HALF.get(precision, torch.float32)


class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward inside the `with` block."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.storages:
            self.storages[ptr] = st.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    def total(self, exclude: set[int]) -> int:
        """Bytes of the counted storages whose address is not in `exclude`."""
        return sum(n for ptr, n in self.storages.items() if ptr not in exclude and ptr != 0)


def module_storages(*modules: torch.nn.Module) -> set[int]:
    """Storage addresses of the parameters and buffers of `modules` (not activations)."""
    out = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t is not None:
                out.add(t.untyped_storage().data_ptr())
    return out


def _timed(fn, device: torch.device) -> float:
    """Seconds of one call: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(modules: list[torch.nn.Module], forward, inputs_grad, device: torch.device, warmup: int,
             reps: int) -> PieceResult:
    """Count saved bytes over one forward, then time `reps` forward/backward pairs after `warmup`.

    `forward()` returns the output to differentiate; `inputs_grad(out)` gives the gradient to feed
    backward (None for a scalar loss).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
    with SavedTensorCounter() as counter:
        out = forward()
    allocator = None
    if cuda:
        torch.cuda.synchronize()
        allocator = int(torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes())
    counted = counter.total(module_storages(*modules))
    grad = inputs_grad(out)
    out.backward(grad)
    del out
    fwd, bwd = [], []
    holder: list = [None]
    for i in range(warmup + reps):
        for m in modules:
            m.zero_grad(set_to_none=True)

        def run_forward():
            holder[0] = forward()

        def run_backward():
            holder[0].backward(grad)

        tf = _timed(run_forward, device)
        tb = _timed(run_backward, device)
        holder[0] = None
        if i >= warmup:
            fwd.append(tf)
            bwd.append(tb)
    return PieceResult(statistics.median(fwd), statistics.median(bwd), counted, allocator)


def measure_block(spec: ModelSpec, tp: int, mbs: int, seq: int, recompute: str, precision: str,
                  device: torch.device, warmup: int = 2, reps: int = 5, layer_id: int = 0) -> PieceResult:
    """One `runtime.models.TransformerBlock` (layer `layer_id`'s kind: a dense or a mixture-of-experts MLP, the
    latter with every expert here and the micro-batch's tokens routed as they come) at the local shapes of a TP
    shard of size `tp`, on a micro-batch of `mbs` sequences of `seq` tokens, in `precision` (as it runs: see
    `runtime.train.run_precision`)."""
    from runtime.models import TransformerBlock

    block = _prepare(TransformerBlock(spec, tp_degree=tp, layer_id=layer_id, recompute=recompute), precision,
                     device)
    x = torch.randn(mbs, seq, spec.hidden_size, device=device, dtype=_act_dtype(precision), requires_grad=True)
    return _measure_call(block, lambda: block(x), precision, device, warmup, reps)


def _measure_call(module: torch.nn.Module, call, precision: str, device: torch.device, warmup: int, reps: int,
                  grad=lambda out: torch.randn_like(out)) -> PieceResult:
    """Time `call()` (forward of `module`, under the precision's autocast) and its backward with `grad(out)`."""
    ctx = _autocast(precision, device)

    def forward():
        with ctx:
            return call()

    return _measure([module], forward, grad, device, warmup, reps)


def measure_embedding(spec: ModelSpec, tp: int, mbs: int, seq: int, precision: str, device: torch.device,
                      warmup: int = 2, reps: int = 5) -> PieceResult:
    """The token (and position) embedding of one TP shard: vocab/tp rows, ids within the shard."""
    from runtime.models import Embedding

    emb = _prepare(Embedding(spec, tp_degree=tp), precision, device)
    tokens = torch.randint(0, spec.vocab_size // tp, (mbs, seq), device=device)
    return _measure_call(emb, lambda: emb(tokens), precision, device, warmup, reps)


def measure_head(spec: ModelSpec, tp: int, mbs: int, seq: int, precision: str, device: torch.device,
                 warmup: int = 2, reps: int = 5) -> PieceResult:
    """Final norm, output projection (vocab/tp columns) and the fp32 cross-entropy loss of one TP shard."""
    from runtime.models import LMHead, lm_loss

    head = _prepare(LMHead(spec, tp_degree=tp), precision, device)
    x = torch.randn(mbs, seq, spec.hidden_size, device=device, dtype=_act_dtype(precision), requires_grad=True)
    targets = torch.randint(0, spec.vocab_size // tp, (mbs, seq), device=device)
    return _measure_call(head, lambda: lm_loss(head(x), targets), precision, device, warmup, reps,
                         grad=lambda out: None)


def measure_optimizer(spec: ModelSpec, optimizer: str, device: torch.device, warmup: int = 2,
                      reps: int = 5) -> float:
    """Seconds per parameter of one optimizer step over the fp32 parameters of one block (tp 1), with
    gradients present: the runtime steps fp32 parameters (FSDP2 and autocast both keep them fp32), with the
    runtime's optimizer settings (`runtime.train.make_optimizer`)."""
    from runtime.models import TransformerBlock
    from runtime.train import DEFAULT_LR, make_optimizer

    block = TransformerBlock(spec, tp_degree=1, layer_id=0).to(device)
    params = [p for p in block.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_optimizer(params, optimizer, DEFAULT_LR)
    times = []
    for i in range(warmup + reps):
        t = _timed(opt.step, device)
        if i >= warmup:
            times.append(t)
    return statistics.median(times) / sum(p.numel() for p in params)
