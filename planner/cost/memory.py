"""Bytes held per GPU: model states by precision recipe and ZeRO stage, activations kept for backward,
and transient buffers.

Model states follow ZeRO (Rajbhandari et al., arXiv:1910.02054, Sec. 3 and 5.1), generalised to the
precision recipes meshplan names; activations follow Korthikanti et al. (arXiv:2205.05198, Sec. 4 and
Table 2), generalised to flash attention, no dropout, grouped-query attention, SwiGLU and fp32 residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.kernels import FP32, Dtypes
from planner.cost.params import layer_params, padded_vocab_size
from planner.specs import ModelSpec

GIB = 2 ** 30
TOKEN_ID = 8                       # int64 token ids kept by the embedding and the loss


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of one precision recipe and optimizer."""

    weights: int      # the parameters the model computes with
    grads: int        # gradient buffer
    master: int       # fp32 master copy (0 when the weights already are fp32)
    optimizer: int    # optimizer moments

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.master + self.optimizer


def state_bytes(precision: str, optimizer: str) -> StateBytes:
    """bf16: Megatron bf16 with fp32 main grads (2+4+4+8 = 18 B/param for Adam); fp16: the ZeRO paper's
    mixed-precision Adam (2+2+12 = 16, arXiv:1910.02054 Sec. 3.1); amp-bf16 and fp32: fp32 weights and
    grads with a plain optimizer (4+4+8 = 16)."""
    moments = 4 if optimizer == "sgd" else 8          # SGD momentum buffer, or Adam m and v
    return {"bf16": StateBytes(2, FP32, FP32, moments), "fp16": StateBytes(2, 2, FP32, moments),
            "amp-bf16": StateBytes(FP32, FP32, 0, moments), "fp32": StateBytes(FP32, FP32, 0, moments)}[precision]


@dataclass(frozen=True)
class ModelStates:
    params: float
    grads: float
    optimizer: float       # master weights + moments (ZeRO's "optimizer states")


def model_state_bytes(params: float, sb: StateBytes, zero: int, dp: int) -> ModelStates:
    """Per-GPU bytes for `params` local parameters. ZeRO-1 shards master and moments over the dp group,
    ZeRO-2 also gradients, ZeRO-3 also weights: with the fp16 recipe 4P+12P/d, 2P+14P/d, 16P/d."""
    return ModelStates(params=params * sb.weights / (dp if zero >= 3 else 1),
                       grads=params * sb.grads / (dp if zero >= 2 else 1),
                       optimizer=params * (sb.master + sb.optimizer) / (dp if zero >= 1 else 1))


# ----------------------------------------------------------------------------------------------
# Activations (bytes per micro-batch on one TP rank)
# ----------------------------------------------------------------------------------------------
def norm_stats(m: ModelSpec) -> int:
    """Bytes per row a norm keeps besides its input: fp32 mean and 1/std (LayerNorm) or 1/rms (RMSNorm)."""
    return FP32 * (2 if m.norm == "layernorm" else 1)


def block_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str,
                           dt: Dtypes) -> float:
    """Bytes one block keeps for its backward. With the GPT layer of Korthikanti et al. (eager attention,
    dropout, 16-bit) this is their Table 2: sbh(34 + 5as/h) alone, sbh(10 + 24/t + 5as/(ht)) with TP,
    sbh(34/t + 5as/(ht)) with TP+SP, without the 5as/h term under selective recompute, 2sbh under full,
    plus the norms' per-row statistics the table leaves out (8 bytes per row each, 0.02% at h = 6144)."""
    e, er = dt.act, dt.residual
    tokens = mbs * seq
    local = tokens / tp if sp else tokens          # sequence-sharded tensors under SP
    h, d = m.hidden_size, m.head_dim
    heads, kv = m.num_heads / tp, m.kv_heads / tp
    mask = 1 if m.dropout > 0 else 0
    if recompute == "full":
        return er * local * h                       # only the block input
    norms = 2 * local * (er * h + norm_stats(m))    # inputs of the two norms and their per-row statistics
    linear_inputs = 2 * e * local * h               # QKV and fc1 inputs (norm outputs)
    dropout_masks = 2 * mask * local * h            # after attention and after the MLP
    if m.attention_kernel == "flash":
        # q, k, v, output (also the projection's input) and the fp32 log-sum-exp per row
        attention = e * tokens * d * (2 * heads + 2 * kv) + FP32 * mbs * heads * seq
    else:
        # q, k and v (k, v expanded to every query head), the projection's input, and the score matrices:
        # softmax output, and with dropout its 1-byte mask and dropped-out copy
        scores = mbs * heads * seq * seq
        attention = e * tokens * d * heads * 4
        if recompute != "selective":
            attention += scores * (e + (mask + e if mask else 0))
    f = m.ffn_size / tp
    mlp = e * tokens * f * (3 if m.mlp == "swiglu" else 2)   # gate, up, product / GELU input and output
    cast_weights = 0.0
    if dt.residual == FP32 and dt.act < FP32:
        # autocast keeps the 16-bit copy of each weight it cast for the backward
        cast_weights = dt.act * layer_params(m).sharded / tp
    return norms + linear_inputs + dropout_masks + attention + mlp + cast_weights


def embedding_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool) -> float:
    local = mbs * seq / tp if sp else mbs * seq
    return TOKEN_ID * mbs * seq + (local * m.hidden_size if m.dropout > 0 else 0)


def head_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes) -> float:
    """Final norm input, LM-head input, fp32 softmax of the logits and the targets (last stage)."""
    tokens = mbs * seq
    local = tokens / tp if sp else tokens
    return (local * (m.hidden_size * (dt.residual + dt.act) + norm_stats(m))
            + FP32 * tokens * padded_vocab_size(m, tp) / tp + TOKEN_ID * tokens)


def head_transient_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, dt: Dtypes) -> float:
    """Logits in flight while the loss runs: the matmul output and its fp32 copy (or fp32 gradient)."""
    logits = mbs * seq * padded_vocab_size(m, tp) / tp
    return logits * (dt.act + FP32) if dt.act < FP32 else logits * FP32


def block_backward_transient_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str,
                                   dt: Dtypes) -> float:
    """Working set of one block's backward beyond what is kept: its recomputed activations under full
    recompute, and the gradients of its widest activations (MLP intermediate and a few h-wide ones)."""
    tokens = mbs * seq
    grads = dt.act * tokens * (2 * m.ffn_size / tp + 3 * m.hidden_size)
    if recompute == "full":
        grads += (block_activation_bytes(m, mbs, seq, tp, sp, "none", dt)
                  - block_activation_bytes(m, mbs, seq, tp, sp, "full", dt))
    return grads


def in_flight_microbatches(schedule: str, pp: int, stage: int, m: int) -> int:
    """Micro-batches whose activations a stage holds at its peak: GPipe all m; 1F1B p - stage
    (Narayanan et al. SC21, Sec. 2.2.1)."""
    if schedule == "gpipe":
        return m
    return min(pp - stage, m)


def interleaved_in_flight_chunks(pp: int, vpp: int, stage: int, m: int) -> list[int]:
    """Model chunks (by local chunk index) of the forwards a stage has done but not yet backed at its peak
    under interleaved 1F1B: Megatron's warm-up of (p - stage - 1)*2 + (v - 1)*p forwards, plus one."""
    total = m * vpp
    warmup = min((pp - stage - 1) * 2 + (vpp - 1) * pp, total)
    held = min(warmup + 1, total)
    counts = [0] * vpp
    for k in range(held):
        counts[(k // pp) % vpp] += 1
    return counts
