"""Activation bytes the profiler counts for the runtime's block (saved-tensor hooks, one count per storage)
against the cost model's analytical bytes (`planner.cost.memory.block_activation_bytes`).

Every variant the runtime implements: flash / eager attention, GELU (GPT: LayerNorm, learned positions,
biases) / SwiGLU (Llama: RMSNorm, RoPE, grouped-query attention), with and without dropout, recompute
none / selective / full, TP shard sizes 1 and 2, counted as the meshplan engine (what the runtime runs) keeps
them. Pinned exactly, with the reason: on CPU, torch's fused attention with dropout falls back to the math
kernel, which keeps what eager attention keeps but with an fp32 (not 1-byte) dropout mask. Under autocast
(amp-bf16) every Linear casts the fp32 norm output to bf16 itself, so the separate q / k / v (and gate / up)
projections keep one bf16 copy each: the meshplan engine models that (`autocast_casts_per_linear`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from planner.cost.kernels import Dtypes, KernelOptions
from planner.cost.memory import autocast_weight_bytes, block_activation_bytes
from planner.engine import load_engine
from planner.specs import ModelSpec
from profiler.layers import measure_block

MBS, SEQ, H = 2, 128, 64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bytes do not depend on threads; one thread avoids OpenMP spinning on a shared 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec(kernel: str, mlp: str, dropout: float) -> ModelSpec:
    llama = mlp == "swiglu"
    return ModelSpec(name=f"{mlp}-{kernel}", num_layers=2, hidden_size=H, num_heads=4,
                     num_kv_heads=2 if llama else None, vocab_size=256, max_position_embeddings=256, mlp=mlp,
                     norm="rmsnorm" if llama else "layernorm", bias=not llama,
                     position_embedding="rope" if llama else "learned", dropout=dropout, attention_kernel=kernel)


MESHPLAN = KernelOptions.of(load_engine("meshplan"))


def analytical(m: ModelSpec, tp: int, recompute: str, precision: str) -> float:
    return block_activation_bytes(m, MBS, SEQ, tp, False, recompute, Dtypes.of(precision), MESHPLAN)


def counted(m: ModelSpec, tp: int, recompute: str, precision: str) -> int:
    return measure_block(m, tp, MBS, SEQ, recompute, precision, CPU, warmup=0, reps=1).activation_bytes


VARIANTS = list(itertools.product(["flash", "eager"], ["gelu", "swiglu"], [0.0, 0.1], ["none", "selective", "full"],
                                  [1, 2]))


@pytest.mark.parametrize("kernel,mlp,dropout,recompute,tp", VARIANTS)
def test_fp32_block_bytes_match_the_cost_model(kernel, mlp, dropout, recompute, tp):
    m = spec(kernel, mlp, dropout)
    got = counted(m, tp, recompute, "fp32")
    expect = analytical(m, tp, recompute, "fp32")
    if kernel == "flash" and dropout > 0 and recompute != "full":
        # CPU math fallback: eager attention's tensors (not checkpointed: the runtime's selective
        # recompute wraps the eager core only), with a 4-byte instead of a 1-byte dropout mask
        scores = MBS * m.num_heads / tp * SEQ * SEQ
        expect = analytical(spec("eager", mlp, dropout), tp, "none", "fp32") + 3 * scores
    assert got == pytest.approx(expect, rel=0.05), f"counted {got} B, analytical {expect:.0f} B"


@pytest.mark.parametrize("kernel,mlp,recompute,tp",
                         list(itertools.product(["flash", "eager"], ["gelu", "swiglu"], ["none", "selective", "full"],
                                                [1, 2])))
def test_bf16_block_bytes_match_the_cost_model(kernel, mlp, recompute, tp):
    m = spec(kernel, mlp, 0.0)
    got = counted(m, tp, recompute, "bf16")
    expect = analytical(m, tp, recompute, "bf16")
    assert got == pytest.approx(expect, rel=0.05), f"counted {got} B, analytical {expect:.0f} B"


@pytest.mark.parametrize("kernel,mlp,tp", list(itertools.product(["flash", "eager"], ["gelu", "swiglu"], [1, 2])))
def test_amp_bf16_block_bytes_match_the_cost_model_with_per_linear_casts(kernel, mlp, tp):
    """One block under autocast: its activations (each Linear's own bf16 cast of its input) plus the bf16 copies
    of its weights, which the cost model charges once per step (autocast caches them for the whole step)."""
    m = spec(kernel, mlp, 0.0)
    got = counted(m, tp, "none", "amp-bf16")
    expect = analytical(m, tp, "none", "amp-bf16") + autocast_weight_bytes(m, tp, Dtypes.of("amp-bf16"))
    assert got == pytest.approx(expect, rel=0.05), f"counted {got} B, expected {expect:.0f} B"
    shared = block_activation_bytes(m, MBS, SEQ, tp, False, "none", Dtypes.of("amp-bf16"))   # one shared cast
    assert got > (shared + autocast_weight_bytes(m, tp, Dtypes.of("amp-bf16"))) * 1.02


def test_parameters_buffers_and_the_input_are_not_activations():
    """Full recompute keeps only the block input (the checkpoint's saved input): nothing of the weights,
    RoPE tables or the causal mask."""
    m = spec("eager", "swiglu", 0.0)
    assert counted(m, 1, "full", "fp32") == MBS * SEQ * H * 4
