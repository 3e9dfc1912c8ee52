"""Exact parameter counts of a decoder-only transformer, whole and per pipeline piece."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from planner.specs import ModelSpec


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer block (elements), split by how tensor and expert parallelism treat them.
    Float counts: the cost model uses the mean block of a model whose layers differ (dense and MoE)."""

    sharded: float       # weight matrices and their biases, divided over the TP group
    replicated: float    # norms, row-parallel output biases and routers, held whole on every TP rank
    experts: float = 0.0  # routed experts' weights: divided over the EP group, each expert over the TP group

    @property
    def total(self) -> float:
        return self.sharded + self.replicated + self.experts

    def per_tp_rank(self, tp: int, ep: int = 1) -> float:
        return self.sharded / tp + self.replicated + self.experts / (tp * ep)

    def dense_per_tp_rank(self, tp: int) -> float:
        """The parameters reduced over the whole data-parallel group (all but the routed experts)."""
        return self.sharded / tp + self.replicated


def mlp_params(m: ModelSpec, width: int, bias: bool) -> int:
    """One MLP of `width`: gated (gate, up, down: 3hf) or GELU (2hf), with biases when `bias`."""
    h, gated = m.hidden_size, m.mlp != "gelu"
    return h * width * (3 if gated else 2) + ((width * (2 if gated else 1)) if bias else 0)


def layer_params(m: ModelSpec, moe_layer: bool = False) -> LayerParams:
    """One block: attention (q, k, v, o), MLP (dense, or routed experts with a router and shared experts) and
    the norms.

    Llama-style count from DESIGN.md: h*(a + 2k)*(h/a) + h*h + 3*h*f + 2h; GPT-style (Megatron SC21,
    arXiv:2104.04473 Sec. 5.1): 12h^2 + 13h per layer; latent attention: planner/cost/mla.py.
    MoE layer (DESIGN.md Sec. 10): experts 3*h*f_e*E (gated), router h*E, shared 3*h*f_s*S.
    """
    h, d, f = m.hidden_size, m.dim_per_head, m.ffn_size
    q_out, kv_out = m.num_heads * d, m.kv_heads * d
    qkv = h * (q_out + 2 * kv_out) + ((q_out + 2 * kv_out) if m.has_qkv_bias else 0)
    proj = q_out * h
    one_norm = 2 * h if m.norm == "layernorm" and m.bias else h
    norm = one_norm * (4 if m.sandwich_norm else 2) + (2 * d if m.qk_norm == "rmsnorm" else 0)
    row_biases = 2 * h if m.bias else 0   # output biases of the two row-parallel linears
    if m.mla is not None:                 # latent attention instead of q/k/v/o (planner/cost/mla.py)
        from planner.cost.mla import attention_params
        qkv_sharded, qkv_replicated = attention_params(m)
        qkv, proj, norm = qkv_sharded, 0, norm + qkv_replicated
    if not moe_layer:
        return LayerParams(sharded=qkv + proj + mlp_params(m, f, m.bias), replicated=norm + row_biases)
    e = m.moe
    shared = mlp_params(m, e.shared_width, m.bias) if e.shared_width else 0
    router = h * e.num_experts + (h if e.shared_expert_gate and e.shared_width else 0)
    return LayerParams(sharded=qkv + proj + shared, replicated=norm + row_biases + router,
                       experts=e.num_experts * mlp_params(m, e.expert_ffn_size, False))


def layer_kinds(m: ModelSpec) -> list[tuple[bool, int]]:
    """(is a MoE layer, how many) for the model's dense and MoE layers (counts > 0 only)."""
    moe = m.num_moe_layers
    return [(kind, n) for kind, n in ((False, m.num_layers - moe), (True, moe)) if n > 0]


def layer_mix(m: ModelSpec) -> list[tuple[tuple[bool, bool], int]]:
    """((is a MoE layer, attends in a sliding window), how many layers) over the model's layers."""
    counts: dict[tuple[bool, bool], int] = {}
    for i in range(m.num_layers):
        key = (m.moe is not None and m.moe.is_moe_layer(i), m.is_windowed_layer(i))
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items())


def mean_layer_params(m: ModelSpec, mix: Sequence[tuple[tuple[bool, bool], int]] | None = None) -> LayerParams:
    """The mean block of the model, or of the layers `mix` counts ((is MoE, windowed), how many; `layer_mix`'s
    form): its dense and MoE layers weighted by their counts."""
    counts = layer_kinds(m) if mix is None else [(moe, n) for (moe, _), n in mix]
    total = sum(n for _, n in counts)
    parts = [(layer_params(m, kind), n / total) for kind, n in counts]
    return LayerParams(sharded=sum(p.sharded * w for p, w in parts), replicated=sum(p.replicated * w for p, w in parts),
                       experts=sum(p.experts * w for p, w in parts))


def blocks_params(m: ModelSpec) -> int:
    """Parameters of all blocks (exact)."""
    return round(sum(layer_params(m, kind).total * n for kind, n in layer_kinds(m)))


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


def norm_tensors(m: ModelSpec) -> int:
    """Parameter tensors of one norm: a scale, and a bias for a LayerNorm with biases."""
    return 2 if m.norm == "layernorm" and m.bias else 1


def final_norm_params(m: ModelSpec) -> int:
    return 2 * m.hidden_size if m.norm == "layernorm" and m.bias else m.hidden_size


def lm_head_params(m: ModelSpec) -> int:
    """Output projection of the real vocabulary, counted only when it is not tied to the embedding."""
    return 0 if m.tied_embeddings else m.vocab_size * m.hidden_size


def total_params(m: ModelSpec) -> int:
    """Unique trainable parameters of the model itself (the real vocabulary, no padding rows)."""
    return (blocks_params(m) + m.vocab_size * m.hidden_size + position_params(m)
            + final_norm_params(m) + lm_head_params(m))


def active_params(m: ModelSpec) -> int:
    """Parameters one token's computation passes through: all of a dense model; of a MoE model every layer's
    attention, norms, router and shared experts and top_k of its routed experts (DESIGN.md Sec. 10), and the
    embedding and LM head (as Mixtral's 12.9B and Qwen3-30B-A3B's 3.3B count them)."""
    if m.moe is None:
        return total_params(m)
    routed = sum(layer_params(m, True).experts * n for kind, n in layer_kinds(m) if kind)
    return total_params(m) - round(routed * (1 - m.moe.top_k / m.moe.num_experts))


def tensors_per_block(m: ModelSpec, fused_projections: bool, moe_layer: bool = False,
                      experts_apart: bool = False) -> int:
    """Parameter tensors of one block: the weight matrices (q/k/v and gate/up one each when fused), their
    biases, the two norms' scales and biases. An MoE block (`moe_layer`) has, for its MLP, the router, the routed
    experts' stacked gate, up and down (not counted when `experts_apart`: wrapped as a unit of their own,
    EXPERT_UNIT_TENSORS) and the shared experts' gate, up and down (one module of their total width)."""
    swiglu = m.mlp != "gelu"
    attention = (1 if fused_projections else 3) + 1
    mlp = (1 if fused_projections or not swiglu else 2) + 1
    qkv_biases = ((1 if fused_projections else 3) if m.has_qkv_bias else 0)
    other_biases = (1 + mlp) if m.bias else 0
    norms = 2 * norm_tensors(m)
    if m.mla is not None:             # latent attention's matrices and norms instead of q/k/v/o's
        from planner.cost.mla import attention_tensors
        attention = attention_tensors(m)
        qkv_biases = 0
    if moe_layer and m.moe is not None:
        mlp = 1 + (0 if experts_apart else EXPERT_UNIT_TENSORS) + (3 if m.moe.shared_width else 0)
        other_biases = 1 if m.bias else 0
    return attention + mlp + qkv_biases + other_biases + norms


EXPERT_UNIT_TENSORS = 3   # the routed experts of an MoE block: gate, up and down, each stacked over the experts


def sharded_projections(m: ModelSpec, fused_projections: bool, moe_layer: bool = False) -> int:
    """Projections of one block that tensor parallelism runs as DTensor ops (ColwiseParallel / RowwiseParallel in
    runtime/parallelize.py): q/k/v (one when fused) and the output; the MLP's (gate/up one when fused) and down; in an
    MoE block only the shared experts' gate, up and down (the routed experts compute on their local shards)."""
    swiglu = m.mlp != "gelu"
    attention = (2 if fused_projections else 4) if m.mla is None else _mla_projections(m)
    if moe_layer and m.moe is not None:
        return attention + (3 if m.moe.shared_width else 0)
    return attention + ((2 if fused_projections else 3) if swiglu else 2)


def _mla_projections(m: ModelSpec) -> int:
    """Latent attention's weight matrices (q down and up, or q; kv down, kv up; output)."""
    return 5 if m.mla.q_lora_rank else 4
