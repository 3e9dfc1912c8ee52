"""Bytes held per GPU: model states by memory recipe and ZeRO stage, activations kept for backward, and the
buffers of the embedding, the head and the backward.

Model states follow ZeRO (Rajbhandari et al., arXiv:1910.02054, Sec. 3 and 5.1), generalised to the recipes
the engines run (planner/engine.py MemoryRecipe); activations follow Korthikanti et al. (arXiv:2205.05198,
Sec. 4 and Table 2), generalised to flash attention, no dropout, grouped-query attention, SwiGLU, fp32
residuals and the recompute policies of the engines. How these combine over a step is `timeline.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.kernels import (FP32, MEGATRON, Dtypes, KernelOptions, fused_softmax_runs, kept_projections,
                                  projection_widths)
from planner.cost.params import LayerParams, mean_layer_params
from planner.specs import ModelSpec

GIB = 2 ** 30
TOKEN_ID = 8                       # int64 token ids kept by the embedding and the loss


@dataclass(frozen=True)
class StateBytes:
    """Bytes per local parameter on one GPU after ZeRO sharding."""

    weights: float      # the parameters as stored
    grads: float        # gradients the optimizer reads (after reduction)
    optimizer: float    # fp32 master weights and moments (ZeRO's "optimizer states")

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def moments(optimizer: str) -> int:
    """Optimizer moments per parameter: Adam's m and v, SGD's momentum buffer."""
    return 1 if optimizer == "sgd" else 2


def state_bytes(recipe, optimizer: str, zero: int, dp: int) -> StateBytes:
    """Per-parameter bytes of a memory recipe (planner.engine.MemoryRecipe) at a ZeRO stage: each state is
    divided by dp from the stage that shards it. With DeepSpeed's fp16 recipe this is the ZeRO paper's
    4P+12P/d, 2P+14P/d and 16P/d for stages 1-3 (arXiv:1910.02054 Sec. 5)."""
    def share(term) -> float:
        return term.bytes / (dp if zero >= term.sharded_from else 1)
    opt = recipe.moment_bytes * moments(optimizer) / (dp if zero >= recipe.moments_sharded_from else 1)
    return StateBytes(weights=share(recipe.weights), grads=share(recipe.grads), optimizer=share(recipe.master) + opt)


# ----------------------------------------------------------------------------------------------
# Activations (bytes per micro-batch on one TP rank)
# ----------------------------------------------------------------------------------------------
def norm_stats(m: ModelSpec) -> int:
    """Bytes per row a norm keeps besides its input: fp32 mean and 1/std (LayerNorm) or 1/rms (RMSNorm)."""
    return FP32 * (2 if m.norm == "layernorm" else 1)


def block_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str,
                           dt: Dtypes, opts: KernelOptions = MEGATRON, moe_layer: bool = False,
                           imbalance: float = 1.0) -> float:
    """Bytes one block keeps for its backward. With the GPT layer of Korthikanti et al. (eager attention,
    dropout, 16-bit) and Megatron's semantics this is their Table 2: sbh(34 + 5as/h) alone,
    sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP+SP, without the 5as/h term under selective
    recompute, 2sbh under full, plus the norms' per-row statistics the table leaves out (8 bytes per row each).
    Engine differences (`opts`): torchtitan's per-op selective policy, sequence-parallel inputs kept gathered
    (DTensor), autocast casting each Linear's input separately. The 16-bit weight copies autocast keeps are
    not activations (`autocast_weight_bytes`). A MoE layer keeps its routed tokens' activations instead of the
    dense MLP's (planner/cost/moe.py); sandwich norms and q/k norms keep their inputs too."""
    e, er = dt.act, dt.residual
    tokens = mbs * seq
    local = tokens / tp if sp else tokens          # sequence-sharded tensors under SP
    h, d = m.hidden_size, m.dim_per_head
    heads, kv = m.num_heads / tp, m.kv_heads / tp
    mask = 1 if m.dropout > 0 else 0
    if recompute == "full":
        return er * local * h                       # only the block input
    if recompute == "selective" and opts.selective == "save_every_other_matmul":
        return _op_policy_bytes(m, mbs, seq, tp, sp, dt, opts, moe_layer, imbalance)
    norms = (4 if m.sandwich_norm else 2) * local * (er * h + norm_stats(m))   # norm inputs and row statistics
    if m.qk_norm != "none":
        norms += e * tokens * d * (heads + kv) + FP32 * tokens * (heads + kv)
    gathered = tokens if (sp and opts.sp_saves == "gathered") else local
    swiglu = m.mlp != "gelu"                        # gated MLP (SwiGLU, GeGLU)
    copies = (3 + (2 if swiglu else 1)) if (dt.autocast and opts.casts_per_linear) else 2
    linear_inputs = copies * e * gathered * h       # QKV and fc1 inputs (the norm outputs, or their casts)
    dropout_masks = 2 * mask * local * h            # after attention and after the MLP
    if m.attention == "flash":
        # q, k, v, output (also the projection's input) and the fp32 log-sum-exp per row
        attention = e * tokens * d * (2 * heads + 2 * kv) + FP32 * mbs * heads * seq
    else:
        # q, k and v (k, v expanded to every query head), the projection's input, and the score matrices:
        # softmax output (fp32 where Megatron falls back to PyTorch's softmax), and with dropout its 1-byte
        # mask and dropped-out copy
        scores = mbs * heads * seq * seq
        attention = e * tokens * d * heads * 4
        fallback = "softmax" in opts.fused and not fused_softmax_runs(opts, mbs, heads, seq)
        if not (recompute == "selective" and opts.selective == "attention_core"):
            attention += scores * ((FP32 if fallback else e) + (mask + e if mask else 0))
    if m.mla is not None:     # latent attention: its own inputs and core instead of q/k/v's (planner/cost/mla.py)
        from planner.cost.mla import attention_activation_bytes
        linear_inputs = (copies - 3 if copies > 2 else 1) * e * gathered * h     # fc1's input (and casts) alone
        attention = attention_activation_bytes(m, mbs, seq, tp, sp, recompute, dt, opts)
    f = m.ffn_size / tp
    mlp = e * tokens * f * (3 if swiglu else 2)     # gate, up, product / GELU input and output
    if moe_layer:
        from planner.cost.moe import moe_activation_bytes
        mlp = moe_activation_bytes(m, tokens, tp, sp, imbalance, dt)
    return norms + linear_inputs + dropout_masks + attention + mlp


def _op_policy_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes, opts: KernelOptions,
                     moe_layer: bool = False, imbalance: float = 1.0) -> float:
    """torchtitan's per-op selective checkpointing: the block input (the checkpoint's), the outputs of the
    kept weight GEMMs (kernels.kept_projections), of the fused attention kernel (output and log-sum-exp) and of
    the sequence-parallel reduce-scatters; everything else is recomputed."""
    e, er = dt.act, dt.residual
    tokens = mbs * seq
    local = tokens / tp if sp else tokens
    h = m.hidden_size
    heads = m.num_heads / tp
    widths = projection_widths(m, tp, "projections" in opts.fused, moe_layer, sp)
    kept = sum(widths[j] for j in kept_projections(len(widths))) * e * tokens
    if moe_layer:               # the experts' kernels are not replayed (kernels._recompute_pass): all kept
        from planner.cost.moe import moe_activation_bytes
        kept += moe_activation_bytes(m, tokens, tp, sp, imbalance, dt)
    attention = (e * tokens * heads * m.dim_per_head + FP32 * mbs * heads * seq) if m.attention == "flash" else 0
    if m.mla is not None and m.attention == "flash":
        from planner.cost.mla import op_policy_attention_bytes
        attention = op_policy_attention_bytes(m, mbs, seq, tp, dt)
    reduce_scatters = 2 * e * local * h if (sp and tp > 1) else 0
    return er * local * h + kept + attention + reduce_scatters


def autocast_weight_bytes(m: ModelSpec, tp: int, dt: Dtypes, ep: int = 1, p: LayerParams | None = None) -> float:
    """Bytes of the 16-bit copies autocast makes of the mean block's Linear weights and biases (one TP rank);
    `p`: the parameters of another mean block (default the model's)."""
    if not dt.autocast:
        return 0.0
    p = p or mean_layer_params(m)
    return dt.act * (p.sharded / tp + p.experts / (tp * ep))


def embedding_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool) -> float:
    local = mbs * seq / tp if sp else mbs * seq
    return TOKEN_ID * mbs * seq + (local * m.hidden_size if m.dropout > 0 else 0)


def head_activation_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes,
                          opts: KernelOptions = MEGATRON, vocab: int | None = None) -> float:
    """Final norm input, LM-head input, the fp32 log-softmax of the logits (what the loss's backward reads) and
    the targets (last stage)."""
    tokens = mbs * seq
    local = tokens / tp if sp else tokens
    vocab = vocab or m.vocab_size
    head_in = tokens if (sp and opts.sp_saves == "gathered") else local
    return (local * (m.hidden_size * dt.residual + norm_stats(m)) + head_in * m.hidden_size * dt.act
            + FP32 * tokens * vocab / tp + TOKEN_ID * tokens)


def head_transient_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, dt: Dtypes, opts: KernelOptions = MEGATRON,
                         vocab: int | None = None, phase: str = "forward") -> float:
    """Logits in flight while the loss runs (beside the fp32 log-softmax the loss keeps, an activation).
    Forward: the matmul output and its fp32 copy. Backward: eager PyTorch's loss backward allocates two fp32
    [tokens, vocab] tensors at once (nll_loss_backward, _log_softmax_backward_data); a fused cross entropy
    (Megatron's) writes the fp32 gradient in place and casts it."""
    logits = mbs * seq * (vocab or m.vocab_size) / tp
    if phase == "backward":
        return logits * (FP32 + dt.act if "cross_entropy" in opts.fused else 2 * FP32)
    return logits * (dt.act + FP32) if (dt.act < FP32 and opts.logits_fp32) else logits * FP32


def block_backward_transient_bytes(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str,
                                   dt: Dtypes, opts: KernelOptions = MEGATRON, moe_layer: bool = False,
                                   imbalance: float = 1.0) -> float:
    """Working set of one block's backward beyond what is kept: the activations its recomputation brings back,
    and the gradients of its activations alive at once (one MLP-wide and two h-wide: autograd frees each as the
    next is made)."""
    tokens = mbs * seq
    grads = dt.act * tokens * (m.ffn_size / tp + 2 * m.hidden_size)
    if moe_layer:   # the routed copies' gradients: one expert-MLP-wide and one h-wide per copy
        rows = tokens * m.moe.top_k * imbalance
        grads = dt.act * (rows * (m.moe.expert_ffn_size / tp + m.hidden_size) + 2 * tokens * m.hidden_size)
    if recompute != "none":
        grads += max(0.0, block_activation_bytes(m, mbs, seq, tp, sp, "none", dt, opts, moe_layer, imbalance)
                     - block_activation_bytes(m, mbs, seq, tp, sp, recompute, dt, opts, moe_layer, imbalance))
    return grads


def in_flight_microbatches(schedule: str, pp: int, stage: int, m: int) -> int:
    """Micro-batches whose activations a stage holds at its peak: GPipe all m; 1F1B p - stage
    (Narayanan et al. SC21, Sec. 2.2.1); without a pipeline one (gradient accumulation runs each micro-batch's
    forward and backward in turn)."""
    if pp == 1:
        return 1
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
