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


VOCAB_MULTIPLE = 128   # Megatron-LM's --make-vocab-size-divisible-by default


def padded_vocab_size(m: ModelSpec, tp: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rows of the embedding and LM head as trained under tensor-parallel degree `tp`: the vocabulary rounded
    up to a multiple of `multiple` * tp, so that every TP rank holds the same number of rows (Megatron-LM's
    `_vocab_size_with_padding`; GPT-2's 50,257 becomes 50,304 at tp 1 and 51,200 at tp 8). The padded
    logits are excluded from the loss, so the loss is the unpadded model's."""
    step = multiple * tp
    return -(-m.vocab_size // step) * step


def embedding_params(m: ModelSpec, tp: int = 1) -> int:
    """Token embedding with the vocabulary padded for `tp` (sharded over TP by vocabulary)."""
    return padded_vocab_size(m, tp) * m.hidden_size


def position_params(m: ModelSpec) -> int:
    """Learned position embedding (replicated over TP); RoPE has none."""
    return m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned" else 0


def final_norm_params(m: ModelSpec) -> int:
    return 2 * m.hidden_size if m.norm == "layernorm" and m.bias else m.hidden_size


def lm_head_params(m: ModelSpec) -> int:
    """Output projection of the real vocabulary, counted only when it is not tied to the embedding."""
    return 0 if m.tied_embeddings else m.vocab_size * m.hidden_size


def total_params(m: ModelSpec) -> int:
    """Unique trainable parameters of the model itself (the real vocabulary, no padding rows)."""
    return (m.num_layers * layer_params(m).total + m.vocab_size * m.hidden_size + position_params(m)
            + final_norm_params(m) + lm_head_params(m))


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
