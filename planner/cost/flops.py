"""Model FLOPs of a decoder-only transformer (2 FLOPs per multiply-add, matmuls only).

Convention (Megatron SC21, arXiv:2104.04473 Sec. 5.1, and the Llama 3 paper): attention scores are counted
for the full s x s matrix even under a causal mask; backward = 2 x forward; the model FLOPs behind MFU do
not count recomputation.
"""

from __future__ import annotations

from planner.cost.params import layer_mix, padded_vocab_size
from planner.specs import ModelSpec


def attended_keys(m: ModelSpec, seq: int, windowed: bool) -> int:
    """Keys each query is counted against: the full sequence, or the window in a sliding-window layer."""
    return min(seq, m.sliding_window) if windowed and m.sliding_window else seq


def layer_forward_flops(m: ModelSpec, tokens: int, seq: int, moe_layer: bool = False,
                        windowed: bool = False) -> float:
    """Forward FLOPs of one block over `tokens` tokens in sequences of length `seq`.

    GPT (f = 4h, a = k): 24*b*s*h^2 + 4*b*s^2*h (Narayanan et al. SC21, Sec. 5.1). A sliding window of w
    counts the full s x w band (w for s); a MoE layer counts its router (2*h*E per token), top_k routed experts
    and the shared experts (DESIGN.md Sec. 10: FLOPs follow the active parameters); latent attention's
    projections and core are planner/cost/mla.py's.
    """
    h, d, f = m.hidden_size, m.dim_per_head, m.ffn_size
    q_out, kv_out = m.num_heads * d, m.kv_heads * d
    gated = 3 if m.mlp != "gelu" else 2
    qkv = 2 * tokens * h * (q_out + 2 * kv_out)
    scores_and_values = 2 * 2 * tokens * attended_keys(m, seq, windowed) * q_out   # Q K^T and P V, full band
    proj = 2 * tokens * q_out * h
    if moe_layer:
        e = m.moe
        mlp = 2 * tokens * h * (e.num_experts + gated * (e.top_k * e.expert_ffn_size + e.shared_width))
    else:
        mlp = 2 * tokens * h * f * gated
    if m.mla is not None:            # latent attention (planner/cost/mla.py)
        from planner.cost.mla import attention_forward_flops
        return float(attention_forward_flops(m, tokens, attended_keys(m, seq, windowed)) + mlp)
    return float(qkv + scores_and_values + proj + mlp)


def blocks_forward_flops(m: ModelSpec, tokens: int, seq: int) -> float:
    """Forward FLOPs of all blocks (each layer as what it is: dense or MoE, global or windowed)."""
    return sum(n * layer_forward_flops(m, tokens, seq, moe, win) for (moe, win), n in layer_mix(m))


def head_forward_flops(m: ModelSpec, tokens: int) -> float:
    """Logits: 2*b*s*h*V (the embedding lookup has no matmul)."""
    return 2.0 * tokens * m.hidden_size * m.vocab_size


def model_flops_per_step(m: ModelSpec, sequences: int, seq: int) -> float:
    """Forward + backward model FLOPs of one optimizer step (no recomputation)."""
    tokens = sequences * seq
    return 3.0 * (blocks_forward_flops(m, tokens, seq) + head_forward_flops(m, tokens))


def hardware_flops_per_step(m: ModelSpec, sequences: int, seq: int, full_recompute: bool, tp: int = 1,
                            padded_vocab: int | None = None) -> float:
    """Model FLOPs plus the extra forward of every block under full recomputation, with the logits of the
    padded vocabulary (`padded_vocab`, default Megatron's padding for `tp`; the model FLOPs behind MFU count the
    real vocabulary; Megatron-LM's logged TFLOP/s counts the padded one).

    With full recompute this is Megatron's 96*B*s*l*h^2*(1 + s/(6h) + V/(16lh)) for GPT models.
    """
    tokens = sequences * seq
    extra = blocks_forward_flops(m, tokens, seq) if full_recompute else 0.0
    padded = padded_vocab if padded_vocab is not None else padded_vocab_size(m, tp)
    padding = 3.0 * 2.0 * tokens * m.hidden_size * (padded - m.vocab_size)
    return model_flops_per_step(m, sequences, seq) + extra + padding
