"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 Sec. 2.1; DeepSeek-V3, arXiv:2412.19437 Sec. 2.1):
its parameters, model FLOPs, kernels on one tensor-parallel rank and the activations its backward keeps.

The block's attention, per token with hidden state h_t (V3 eqs. 1-11; n heads, widths d_h nope, d_h^R rope,
d_v values, d_c kv latent, d_c' q latent):

  c_q = W^{DQ} h_t (d_c'), normed;  q = W^{UQ} c_q -> n x (d_h + d_h^R), RoPE on the d_h^R part    (eqs. 6-9)
  [c_kv, k^R] = W^{DKV,KR} h_t (d_c + d_h^R), c_kv normed, RoPE on k^R (one per token, every head's)  (1-3)
  [k^C, v] = W^{UKV} c_kv -> n x (d_h + d_v);  k = [k^C, k^R]                                      (2, 4, 5)
  o = softmax(q k^T / sqrt(d_h + d_h^R)) v  (n x d_v);  u = W^O o -> h                             (10, 11)

Without a q latent (DeepSeek-V2-Lite) q = W^Q h_t directly. Tensor parallelism as in Megatron-Core's
MLASelfAttention: the up projections (W^{UQ}, W^{UKV}, or W^Q) are column-parallel by heads, W^O row-parallel,
the down projections W^{DQ}, W^{DKV,KR} and the two latent norms duplicated on every TP rank (they run on the
rank's sequence shard under SP, and the latents are all-gathered before the up projections). Training runs the
up projections explicitly (no weight absorption: that is an inference optimisation).
"""

from __future__ import annotations

from planner.cost.kernels import (FP32, Collective, Dtypes, Kernel, KernelOptions, Pass, _norm, _rope, _tp_in,
                                  eager_attention_core)
from planner.specs import ModelSpec


def attention_params(m: ModelSpec) -> tuple[int, int]:
    """(sharded, replicated) parameters of one block's latent attention: the up and output projections split over
    TP; the down projections and latent norms (RMSNorm: one scale per channel; LayerNorm with bias: two) whole on
    every TP rank."""
    a, h, heads = m.mla, m.hidden_size, m.num_heads
    one_norm = 2 if m.norm == "layernorm" and m.bias else 1
    q_up_in = a.q_lora_rank or h
    sharded = q_up_in * heads * a.qk_head_dim + a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim) \
        + heads * a.v_head_dim * h
    replicated = h * (a.kv_lora_rank + a.qk_rope_head_dim) + one_norm * a.kv_lora_rank
    if a.q_lora_rank:
        replicated += h * a.q_lora_rank + one_norm * a.q_lora_rank
    return sharded, replicated


def attention_tensors(m: ModelSpec) -> int:
    """Parameter tensors of the attention: q down + up (or q), kv down, kv up, output; the latent norms."""
    return (5 if m.mla.q_lora_rank else 4) + (2 if m.mla.q_lora_rank else 1) * (2 if m.norm == "layernorm"
                                                                                 and m.bias else 1)


def attention_forward_flops(m: ModelSpec, tokens: float, keys: float) -> float:
    """Model FLOPs of the latent attention over `tokens` tokens, each counted against `keys` keys (2 per
    multiply-add): its projections (2 x their weights per token) and scores at d_h + d_h^R, values at d_v."""
    a, heads = m.mla, m.num_heads
    sharded, replicated = attention_params(m)
    norms = (2 if m.norm == "layernorm" and m.bias else 1) * (a.kv_lora_rank + (a.q_lora_rank or 0))
    core = 2 * keys * heads * (a.qk_head_dim + a.v_head_dim)
    return float(tokens * (2 * (sharded + replicated - norms) + core))


def attention_work(fwd: Pass, bwd: Pass, core: Pass, linear, m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool,
                   keys: float, dt: Dtypes, opts: KernelOptions) -> None:
    """Append the kernels and TP collectives of the latent attention from the norm output to the attention core
    (the core itself to `core`) for one micro-batch on one TP rank; `linear(*widths, k=, bias=, rows=)` adds a
    weight GEMM (kernels.block_work's), `keys` the mean keys per query of the causal flash kernel. The elementwise
    pieces' backward kernels, and without SP the backward all-reduce of the latents' gradients, go to `bwd`."""
    a, e, h = m.mla, dt.act, m.hidden_size
    fused = opts.fused
    tokens = mbs * seq
    local = tokens / tp if sp else tokens               # the down projections run on the sequence shard
    heads = m.num_heads / tp
    qk, nope, rope, v = a.qk_head_dim, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    if a.q_lora_rank:
        linear(a.q_lora_rank, k=h, bias=False, rows=local)                          # W^DQ (duplicated)
        _norm(fwd, bwd, m, local * a.q_lora_rank, e, e, "norm" in fused)              # q latent norm
        _tp_in(fwd, tokens * a.q_lora_rank * e, tp, sp)
        linear(heads * qk, k=a.q_lora_rank, bias=False)                              # W^UQ
    else:
        _tp_in(fwd, tokens * h * e, tp, sp)
        linear(heads * qk, k=h, bias=False)                                          # W^Q
    linear(a.kv_lora_rank + rope, k=h, bias=False, rows=local)                       # W^DKV and W^KR (duplicated)
    _norm(fwd, bwd, m, local * a.kv_lora_rank, e, e, "norm" in fused)                 # kv latent norm
    _tp_in(fwd, tokens * (a.kv_lora_rank + rope) * e, tp, sp)
    linear(heads * (nope + v), k=a.kv_lora_rank, bias=False)                         # W^UKV
    if tp > 1 and not sp:
        # Megatron's `f` in backward: the duplicated down projections' output gradients (the latents' and k^R's)
        # are partial sums over the head shards; their all-reduce replaces the dense block's h-wide one
        latents = (a.q_lora_rank or h) + a.kv_lora_rank + rope
        bwd.collectives.append(Collective("all_reduce", tokens * latents * e))
    _rope(fwd, bwd, tokens * heads * rope, e, "rope" in fused)                       # q^R
    _rope(fwd, bwd, tokens * rope, e, "rope" in fused)                               # k^R, shared by the heads
    # q = [q^C, q^R], k = [k^C, k^R broadcast to every head], v made contiguous for the attention kernel
    assemble = (2 * heads * qk + heads * (nope + qk) + rope + 2 * heads * v) * tokens * e
    fwd.mem(assemble)
    bwd.mem(assemble)
    if m.attention == "flash":
        core.kernels.append(Kernel("attn", 2 * mbs * seq * keys * heads * (qk + v),
                                   (2 * qk + 2 * v) * heads * tokens * e + 4 * heads * tokens,
                                   (mbs * heads * seq / 128, (qk + v) / 2, 1.0)))
    else:
        eager_attention_core(core, mbs, heads, seq, qk, v, e, opts, m.dropout > 0)


def regathered_input_bytes(m: ModelSpec, tokens: int, dt: Dtypes) -> float:
    """Bytes Megatron's sequence-parallel column-parallel linear of the attention gathers again in backward for
    its weight gradient: the q latent (or the hidden state without one); the kv latent is gathered by hand
    before W^UKV and kept whole."""
    return tokens * (m.mla.q_lora_rank or m.hidden_size) * dt.act


def projection_widths(m: ModelSpec, tp: int, sp: bool) -> list[float]:
    """Output widths of the attention's weight GEMMs on one TP rank per token of the micro-batch, in forward
    order (W^DQ, W^UQ or W^Q, W^DKV+KR, W^UKV, W^O); the down projections, on the sequence shard under SP,
    count 1/tp of their width."""
    a = m.mla
    heads, shard = m.num_heads / tp, (1 / tp if sp else 1.0)
    q = [a.q_lora_rank * shard, heads * a.qk_head_dim] if a.q_lora_rank else [heads * a.qk_head_dim]
    return [*q, (a.kv_lora_rank + a.qk_rope_head_dim) * shard, heads * (a.qk_nope_head_dim + a.v_head_dim),
            m.hidden_size]


def attention_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str, dt: Dtypes,
                               opts: KernelOptions) -> float:
    """Bytes the latent attention keeps for its backward on one TP rank, besides the block's norm inputs (counted
    by memory.py): the down projections' input (the norm output, on the sequence shard), each latent norm's
    input and fp32 row statistic, the up projections' inputs (the normed latents; the q latent gathered or not as
    the engine keeps SP inputs, the kv latent gathered by hand and kept whole), and the attention core's: flash
    keeps q, k (d_h + d_h^R per head), v and its output (d_v per head; also W^O's input) and the fp32 log-sum-exp
    per row; eager q, k, v, the output and the score matrices (softmax output, with dropout its mask and
    dropped-out copy) unless selective recomputation replays the core."""
    a, e = m.mla, dt.act
    tokens = mbs * seq
    local = tokens / tp if sp else tokens
    gathered = tokens if (sp and opts.sp_saves == "gathered") else local
    heads = m.num_heads / tp
    down_in = e * local * m.hidden_size
    if a.q_lora_rank:
        q_path = local * (e * a.q_lora_rank + FP32) + e * gathered * a.q_lora_rank
    else:
        q_path = e * (gathered - local) * m.hidden_size if gathered != local else 0.0
    kv_path = local * (e * a.kv_lora_rank + FP32) + e * tokens * a.kv_lora_rank
    qkvo = e * tokens * heads * (2 * a.qk_head_dim + 2 * a.v_head_dim)
    if m.attention == "flash":
        core = qkvo + FP32 * mbs * heads * seq
    else:
        core = qkvo
        if not (recompute == "selective" and opts.selective == "attention_core"):
            mask = 1 if m.dropout > 0 else 0
            core += mbs * heads * seq * seq * (e + (mask + e if mask else 0))
    return down_in + q_path + kv_path + core


def op_policy_attention_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, dt: Dtypes) -> float:
    """What torchtitan's per-op policy keeps of the fused attention kernel: its output (d_v per head) and the
    fp32 log-sum-exp per row."""
    heads = m.num_heads / tp
    return dt.act * mbs * seq * heads * m.mla.v_head_dim + FP32 * mbs * heads * seq

