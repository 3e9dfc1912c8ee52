"""Megatron's fused scale-mask-softmax runs only at some shapes; elsewhere Megatron (and DeepSpeed's
Megatron models) fall back to PyTorch's softmax in fp32. Checked against the kernel's published availability rule
(megatron/model/fused_softmax.py, FusedScaleMaskSoftmax.is_kernel_available) and against the tensors PyTorch's
autograd saves when the fallback's own ops run on CPU."""

from __future__ import annotations

import torch

from planner.cost.kernels import FP32, Dtypes, KernelOptions, block_work, fused_softmax_runs
from planner.cost.memory import block_activation_bytes
from planner.engine import load_engine
from planner.specs import ModelSpec


def megatron_rule(b: int, np_: int, sq: int, sk: int) -> bool:
    """is_kernel_available for a causal mask, as published: batch_per_block (scaled_masked_softmax.h) is
    warps per 128-thread block times batches per warp."""
    attn_batches = b * np_
    if not (16 < sk <= 4096 and sq % 4 == 0 and sk % 4 == 0 and attn_batches % 4 == 0):
        return False
    pow2 = 1 << (sk - 1).bit_length()
    warp = min(pow2, 32)
    batch_per_block = (128 // warp) * (2 if pow2 <= 128 else 1)
    return attn_batches % batch_per_block == 0


def gpt(heads: int = 16, hidden: int = 1024) -> ModelSpec:
    return ModelSpec(name="g", num_layers=2, hidden_size=hidden, num_heads=heads, vocab_size=51200,
                     max_position_embeddings=4096, dropout=0.1, attention_kernel="eager")


def test_availability_matches_megatrons_rule():
    opts = KernelOptions.of(load_engine("deepspeed"))
    checked = 0
    for b in (1, 2, 3, 4, 8):
        for np_ in (1, 2, 3, 4, 6, 8, 12, 16):
            for s in (16, 64, 256, 1000, 1024, 2048, 4096, 8192):
                assert fused_softmax_runs(opts, b, np_, s) == megatron_rule(b, np_, s, s), (b, np_, s)
                checked += 1
    assert checked == 320
    anywhere = KernelOptions.of(load_engine("meshplan"))     # torch.softmax: one kernel at every shape
    assert all(fused_softmax_runs(anywhere, 1, 2, s) for s in (16, 1024, 8192))


def softmax_kernels(mbs: int, tp: int) -> list[float]:
    """Bytes of the elementwise kernels between the two attention matmuls (scores 1024 x 1024 per head)."""
    opts = KernelOptions.of(load_engine("deepspeed"))
    work = block_work(gpt(), mbs, 1024, tp, False, "none", Dtypes.of("fp16"), opts)
    kinds = [k.kind for k in work.forward.kernels]
    first = kinds.index("gemm", kinds.index("gemm") + 1)          # Q K^T follows the QKV projection
    last = first + 1 + kinds[first + 1:].index("gemm")            # P V
    return [k.bytes for k in work.forward.kernels[first + 1:last]]


def test_fallback_runs_the_fp32_chain_of_five_kernels():
    scores = 1 * (16 / 8) * 1024 * 1024          # tp 8, micro-batch 1: 2 local heads, 2 score matrices
    fallback = softmax_kernels(1, 8)
    # cast up (2+4), scale (4+4), masked_fill (4+4), softmax (4+4), cast down (4+2), then dropout (2+2+1)
    assert fallback == [6 * scores, 8 * scores, 8 * scores, 8 * scores, 6 * scores, 5 * scores]
    fused = softmax_kernels(2, 8)                # 4 score matrices: the fused kernel (read 2, write 2)
    assert fused == [4 * 2 * scores, 5 * 2 * scores]


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of fn(x), each storage counted once, x itself excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() != x.data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def test_fallback_keeps_an_fp32_softmax_output():
    b, heads, s = 1, 2, 64
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)     # the model's input, shared by layers
    scores = torch.randn(b, heads, s, s, dtype=torch.float16, requires_grad=True)

    def fallback(x):   # FusedScaleMaskSoftmax.forward_torch_softmax with softmax_in_fp32 and a scale
        y = x.float() * 0.5
        y = y.masked_fill(mask, -10000.0)
        return torch.softmax(y, dim=-1).half()
    kept = saved_bytes(fallback, scores) - mask.numel()                    # the mask is not the layer's
    elements = b * heads * s * s
    assert kept == FP32 * elements
    model = gpt(heads=16)
    opts = KernelOptions.of(load_engine("deepspeed"))
    dt = Dtypes.of("fp16")
    # the same layer at tp 8 (2 local heads): micro-batch 1 falls back, so it keeps 2 more bytes per score
    per_seq = [block_activation_bytes(model, mbs, 1024, 8, False, "none", dt, opts) / mbs for mbs in (1, 4)]
    assert per_seq[0] - per_seq[1] == (FP32 - 2) * 2 * 1024 * 1024
