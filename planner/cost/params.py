"""Exact parameter counts of a decoder-only transformer, whole and per pipeline piece."""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import ModelSpec


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer block (elements), split by how tensor parallelism treats them."""

    sharded: int      # weight matrices and their biases, divided over the TP group
    replicated: int   # norms and row-parallel output biases, held whole on every TP rank

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_tp_rank(self, tp: int) -> float:
        return self.sharded / tp + self.replicated


def layer_params(m: ModelSpec) -> LayerParams:
    """One block: attention (q, k, v, o), MLP and two norms.

    Llama-style count from DESIGN.md: h*(a + 2k)*(h/a) + h*h + 3*h*f + 2h; GPT-style (Megatron SC21,
    arXiv:2104.04473 Sec. 5.1): 12h^2 + 13h per layer.
    """
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    q_out, kv_out = m.num_heads * d, m.kv_heads * d
    qkv = h * (q_out + 2 * kv_out) + ((q_out + 2 * kv_out) if m.has_qkv_bias else 0)
    proj = q_out * h
    up = h * f * (2 if m.mlp == "swiglu" else 1) + (f * (2 if m.mlp == "swiglu" else 1) if m.bias else 0)
    down = f * h
    norm = (2 * h if m.norm == "layernorm" and m.bias else h) * 2
    row_biases = 2 * h if m.bias else 0   # output biases of the two row-parallel linears
    return LayerParams(sharded=qkv + proj + up + down, replicated=norm + row_biases)


def embedding_params(m: ModelSpec) -> int:
    """Token embedding (sharded over TP by vocabulary)."""
    return m.vocab_size * m.hidden_size


def position_params(m: ModelSpec) -> int:
    """Learned position embedding (replicated over TP); RoPE has none."""
    return m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned" else 0


def final_norm_params(m: ModelSpec) -> int:
    return 2 * m.hidden_size if m.norm == "layernorm" and m.bias else m.hidden_size


def lm_head_params(m: ModelSpec) -> int:
    """Output projection, counted only when it is not tied to the embedding."""
    return 0 if m.tied_embeddings else m.vocab_size * m.hidden_size


def total_params(m: ModelSpec) -> int:
    """Unique trainable parameters of the whole model."""
    return (m.num_layers * layer_params(m).total + embedding_params(m) + position_params(m)
            + final_norm_params(m) + lm_head_params(m))


def padded_vocab_size(m: ModelSpec, tp: int, multiple: int = 128) -> int:
    """The vocabulary an engine allocates: padded to a multiple of `multiple` x tp so that every TP rank holds
    an equal, aligned shard (Megatron-LM's --make-vocab-size-divisible-by, 128 by default); padded logits
    are excluded from the loss."""
    step = multiple * tp
    return -(-m.vocab_size // step) * step


def active_params(m: ModelSpec) -> int:
    """Parameters one token's computation passes through (a dense model: all of them)."""
    return total_params(m)


def tensors_per_block(m: ModelSpec, fused_projections: bool) -> int:
    """Parameter tensors of one block: the weight matrices (q/k/v and gate/up one each when fused), their
    biases, the two norms' scales and biases."""
    swiglu = m.mlp == "swiglu"
    matrices = (1 if fused_projections else 3) + 1 + (1 if fused_projections or not swiglu else 2) + 1
    qkv_biases = ((1 if fused_projections else 3) if m.has_qkv_bias else 0)
    other_biases = (1 + (1 if fused_projections or not swiglu else 2) + 1) if m.bias else 0
    norms = 2 * (2 if m.norm == "layernorm" and m.bias else 1)
    return matrices + qkv_biases + other_biases + norms
