"""The kernels one TP rank runs for a block, the embedding and the LM head, and how long each takes.

Each pass (forward, backward, recomputation) is a list of kernels with the FLOPs and device-memory bytes
they move, following Megatron-LM's GPT/Llama block (fused bias-GELU / SwiGLU, fused bias-dropout-add,
fused scale-mask-softmax or a flash kernel, vocab-parallel cross entropy). A kernel's time is the larger
of its compute time (FLOPs over the achievable rate for its shape), its memory time and the host's time
to issue it; tensor-parallel collectives are listed separately and costed by `comm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from planner.cost.params import padded_vocab_size
from planner.specs import GPUSpec, ModelSpec

FP32 = 4


@dataclass(frozen=True)
class Kernel:
    kind: Literal["gemm", "attn", "mem"]
    flops: float = 0.0           # FLOP executed (hardware, not model, FLOPs)
    bytes: float = 0.0           # bytes read and written in device memory
    shape: tuple[float, float, float] = (0.0, 0.0, 0.0)   # (M, N, K) of one GEMM of a batch


@dataclass(frozen=True)
class Collective:
    op: Literal["all_reduce", "all_gather", "reduce_scatter"]
    bytes: float                 # message size M of the collective (the full, unsharded buffer)


@dataclass
class Pass:
    """The work of one pass over a piece of the model, for one micro-batch on one TP rank."""

    kernels: list[Kernel] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)

    def gemm(self, m: float, n: float, k: float, elem: int, batch: float = 1.0) -> None:
        self.kernels.append(Kernel("gemm", 2.0 * batch * m * n * k, elem * batch * (m * k + k * n + m * n),
                                   (m, n, k)))

    def mem(self, nbytes: float) -> None:
        self.kernels.append(Kernel("mem", bytes=nbytes))

    def extend(self, other: "Pass") -> None:
        self.kernels += other.kernels
        self.collectives += other.collectives


@dataclass(frozen=True)
class Dtypes:
    """Element sizes (bytes) of one precision recipe."""

    act: int        # activations and 16-bit GEMM operands
    residual: int   # the residual stream and norm inputs (fp32 under autocast)
    matmul: str     # key into GPUSpec.peak_flops

    @staticmethod
    def of(precision: str) -> "Dtypes":
        return {"bf16": Dtypes(2, 2, "bf16"), "fp16": Dtypes(2, 2, "fp16"),
                "amp-bf16": Dtypes(2, FP32, "bf16"), "fp32": Dtypes(FP32, FP32, "fp32")}[precision]


def kernel_time(k: Kernel, gpu: GPUSpec, dtype: str) -> float:
    """Seconds: max(compute, memory, host issue time)."""
    eff = gpu.efficiency
    memory = k.bytes / (gpu.hbm_bandwidth * eff.memory)
    if k.kind == "mem":
        compute = 0.0
    elif k.kind == "attn":
        compute = k.flops / (gpu.peak(dtype) * eff.flash_attention)
    else:
        compute = k.flops / (gpu.peak(dtype) * eff.gemm_max * shape_efficiency(k.shape, eff.gemm_tile))
    return max(compute, memory, eff.kernel_overhead_s)


def shape_efficiency(shape: tuple[float, float, float], tile: float) -> float:
    """prod(x / (x + tile)) over a GEMM's M, N, K: the share of the GEMM ceiling a shape reaches."""
    out = 1.0
    for x in shape:
        out *= x / (x + tile)
    return out


def pass_time(p: Pass, gpu: GPUSpec, dtype: str) -> float:
    """Seconds of the kernels of a pass (collectives excluded)."""
    return sum(kernel_time(k, gpu, dtype) for k in p.kernels)


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------
@dataclass
class BlockWork:
    forward: Pass
    backward: Pass
    recompute: Pass      # extra forward work before the backward (empty without recomputation)


def _tp_in(p: Pass, nbytes: float, tp: int, sp: bool) -> None:
    """Megatron's `f`/`g` conjugates before a column-parallel linear: all-gather under SP."""
    if tp > 1 and sp:
        p.collectives.append(Collective("all_gather", nbytes))


def _tp_out(p: Pass, nbytes: float, tp: int, sp: bool) -> None:
    """After a row-parallel linear: all-reduce, or reduce-scatter under SP (Korthikanti et al. Sec. 4.2.2)."""
    if tp > 1:
        p.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", nbytes))


def block_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str, dt: Dtypes) -> BlockWork:
    """Kernels and collectives of one block for one micro-batch on one TP rank."""
    e, er = dt.act, dt.residual
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    heads = m.num_heads / tp
    q_out, kv_out = heads * d, m.kv_heads / tp * d
    tokens = mbs * seq
    local_tokens = tokens / tp if sp else tokens        # the residual stream is sequence-sharded under SP
    act_bytes = tokens * h * e
    dropout = m.dropout > 0
    mask = 1 if dropout else 0
    swiglu = m.mlp == "swiglu"
    up_width = f / tp * (2 if swiglu else 1)
    scores = mbs * heads * seq * seq                    # elements of one rank's score matrix

    fwd, bwd, attn_core_fwd = Pass(), Pass(), Pass()
    # --- attention ---
    fwd.mem(local_tokens * h * (er + e))                                         # norm 1
    _tp_in(fwd, act_bytes, tp, sp)
    fwd.gemm(tokens, q_out + 2 * kv_out, h, e)                                   # QKV
    if m.position_embedding == "rope":
        fwd.mem(2 * tokens * (q_out + kv_out) * e)                               # rotate q and k
    if m.attention_kernel == "flash":
        # causal flash kernel skips the masked half of the score matrix
        attn_core_fwd.kernels.append(Kernel("attn", 0.5 * 4 * mbs * seq * seq * q_out,
                                            (2 * q_out + 2 * kv_out) * tokens * e + 4 * heads * tokens))
    else:
        attn_core_fwd.gemm(seq, seq, d, e, batch=mbs * heads)                    # Q K^T
        attn_core_fwd.mem(2 * scores * e)                                        # scale-mask-softmax
        if dropout:
            attn_core_fwd.mem(scores * (2 * e + mask))                           # attention dropout
        attn_core_fwd.gemm(seq, d, seq, e, batch=mbs * heads)                    # P V
        attn_core_fwd.mem(2 * tokens * q_out * e)                                # heads back to [s, b, h]
    fwd.extend(attn_core_fwd)
    fwd.gemm(tokens, h, q_out, e)                                                # output projection
    _tp_out(fwd, act_bytes, tp, sp)
    fwd.mem(local_tokens * h * (2 * e + er + mask))                              # bias-dropout-add
    # --- MLP ---
    fwd.mem(local_tokens * h * (er + e))                                         # norm 2
    _tp_in(fwd, act_bytes, tp, sp)
    fwd.gemm(tokens, up_width, h, e)                                             # fc1 (gate+up)
    fwd.mem(tokens * (up_width + f / tp) * e)                                    # bias-GELU / SwiGLU
    fwd.gemm(tokens, h, f / tp, e)                                               # fc2
    _tp_out(fwd, act_bytes, tp, sp)
    fwd.mem(local_tokens * h * (2 * e + er + mask))                              # bias-dropout-add

    # --- backward: two GEMMs (data and weight gradients) per forward GEMM; elementwise ops read
    # their saved inputs and the incoming gradient and write one gradient ---
    for k in fwd.kernels:
        if k.kind == "gemm":
            mm, nn, kk = k.shape
            batch = k.flops / (2 * mm * nn * kk)
            bwd.gemm(mm, kk, nn, e, batch)      # dX = dY W^T
            bwd.gemm(kk, nn, mm, e, batch)      # dW = X^T dY
        elif k.kind == "attn":
            # FlashAttention-2 backward: 5 matmuls to the forward's 2 (Dao 2023, Sec. 3.1)
            bwd.kernels.append(Kernel("attn", 2.5 * k.flops, 2 * k.bytes))
        else:
            bwd.mem(1.5 * k.bytes)
    for c in fwd.collectives:   # conjugate collectives in backward (all-reduce stays, AG <-> RS swap)
        bwd.collectives.append(Collective({"all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
                                           "all_reduce": "all_reduce"}[c.op], c.bytes))

    if recompute == "full":
        recomp = fwd
    elif recompute == "selective" and m.attention_kernel == "eager":
        recomp = attn_core_fwd     # Korthikanti et al. Sec. 5: recompute only the attention core
    else:
        recomp = Pass()            # flash attention already recomputes its scores inside its backward
    return BlockWork(fwd, bwd, recomp)


# ----------------------------------------------------------------------------------------------
# Embedding and LM head with loss
# ----------------------------------------------------------------------------------------------
def embedding_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes) -> tuple[Pass, Pass]:
    """Vocab-parallel embedding lookup (+ learned positions, dropout); its backward scatters into dE."""
    tokens, h, e = mbs * seq, m.hidden_size, dt.act
    local_tokens = tokens / tp if sp else tokens
    fwd, bwd = Pass(), Pass()
    fwd.mem(tokens * h * e * 2)                                       # gather rows
    if tp > 1:
        fwd.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", tokens * h * e))
    if m.position_embedding == "learned":
        fwd.mem(local_tokens * h * e * 3)
    if m.dropout > 0:
        fwd.mem(local_tokens * h * (2 * e + 1))
    if tp > 1 and sp:
        bwd.collectives.append(Collective("all_gather", tokens * h * e))
    bwd.mem(tokens * h * (e + FP32) + padded_vocab_size(m, tp) / tp * h * FP32)   # scatter-add into the fp32 grad
    return fwd, bwd


def head_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes) -> tuple[Pass, Pass]:
    """Final norm, logits GEMM and vocab-parallel cross entropy in fp32 (Megatron's
    `vocab_parallel_cross_entropy`: cast, max, exp, sum, log-softmax in fp32; backward softmax - one-hot)."""
    tokens, h, e = mbs * seq, m.hidden_size, dt.act
    local_tokens = tokens / tp if sp else tokens
    vocab = padded_vocab_size(m, tp) / tp
    fwd, bwd = Pass(), Pass()
    fwd.mem(local_tokens * h * (dt.residual + e))                     # final norm
    if tp > 1 and sp:
        fwd.collectives.append(Collective("all_gather", tokens * h * e))
    fwd.gemm(tokens, vocab, h, e)                                     # logits
    logits = tokens * vocab
    fwd.mem(logits * (e + FP32))                                      # cast to fp32
    fwd.mem(logits * FP32)                                            # max
    fwd.mem(logits * 2 * FP32)                                        # subtract, exp
    fwd.mem(logits * FP32)                                            # sum
    fwd.mem(logits * 2 * FP32)                                        # normalise (kept for backward)
    if tp > 1:   # max, sum-exp and target-logit all-reduces over the vocab shards: b*s fp32 each
        fwd.collectives += [Collective("all_reduce", tokens * FP32)] * 3
    bwd.mem(logits * (FP32 + e))                                      # softmax - one-hot, cast
    bwd.gemm(tokens, h, vocab, e)                                     # d input
    bwd.gemm(h, vocab, tokens, e)                                     # d weight
    if tp > 1:
        bwd.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", tokens * h * e))
    bwd.mem(local_tokens * h * (dt.residual + 2 * e))                 # final norm backward
    return fwd, bwd
