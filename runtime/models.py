"""GPT-2 and Llama style decoder blocks built from a `ModelSpec`: the one implementation the runtime trains
and the profiler measures.

Every module here takes and returns activations of shape [batch, seq, hidden] (the embedding takes int64
token ids [batch, seq]; the head returns logits [batch, seq, padded vocab]). `tp_degree > 1` builds the local
shard shapes of one tensor-parallel rank (heads/tp, kv_heads/tp, ffn/tp, padded vocab/tp) with no communication,
for profiling; for real tensor parallelism `runtime.parallelize` builds the full modules and shards them
with `torch.distributed.tensor.parallel`, which is why attention infers its local head count from the
projection outputs (`view(b, s, -1, head_dim)`).

What a block keeps for backward is exactly what `planner.cost.memory.block_activation_bytes` counts:
  * the inputs of the two norms (the residual stream) and of the QKV and first MLP projections (the norm
    outputs; q/k/v and gate/up projections share one input tensor);
  * flash attention (`F.scaled_dot_product_attention`): q, k and v (k, v at kv heads), the output (laid out
    so that the output projection's input is a view of it) and an fp32 log-sum-exp per row;
  * eager attention: q, k and v expanded to every query head, the softmax output, and with dropout its
    1-byte mask and dropped-out copy (the causal mask is an additive buffer, so no mask is saved per step),
    then the output projection's input;
  * GELU MLP: the GELU input and output; SwiGLU: gate and up (silu is recomputed in backward by
    `SwiGLUFunction`) and their product (the down projection's input);
  * dropout (`torch.native_dropout`) keeps a 1-byte mask, after attention and after the MLP;
  * RoPE keeps no unrotated q/k (it multiplies by cos/sin buffers that need no gradient);
  * norms keep their input and a per-row statistic (LayerNorm: mean and 1/std, RMSNorm: 1/rms).
Activation recomputation (`recompute`): "full" wraps the whole block in
`torch.utils.checkpoint.checkpoint(use_reentrant=False)` (only the block input is kept, by the checkpoint
frame); "selective" checkpoints only the eager attention core (QK^T, softmax, dropout, PV), a no-op for the
fused kernel, which keeps no score matrix.

Weights are initialised deterministically from (seed, global parameter name) by `init_weights`, so a
pipeline stage holding layers 5-8, a tensor-parallel shard and a single-process model all start from the
same numbers.

The vocabulary is padded (planner.cost.params.padded_vocab_size: to a multiple of 128 * tp, as Megatron-LM
does) so that any tensor-parallel degree splits it evenly: the padding rows of the embedding and LM head
start at zero, no token id reaches them, and the head sets their logits to -inf, so the softmax, the loss and
every gradient are those of the unpadded model.
"""

from __future__ import annotations

import math
import zlib
from typing import get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from planner.cost.params import padded_vocab_size
from planner.specs import ModelSpec, Recompute
from planner.validate import tp_shards

RECOMPUTE_MODES = get_args(Recompute)
INIT_STD = 0.02          # GPT-2 / Megatron initialisation standard deviation


def _check_tp(spec: ModelSpec, tp_degree: int) -> None:
    if tp_degree < 1:
        raise ValueError(f"tp_degree must be >= 1 (got {tp_degree})")
    why = tp_shards(spec, tp_degree)
    if why:
        raise ValueError(why)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that keeps a 1-byte mask for backward on every device (`F.dropout` on CPU keeps an fp32
    mask)."""
    if p == 0.0 or not training:
        return x
    return torch.native_dropout(x, p, True)[0]


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------
def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w, keeping x and the fp32 per-row 1/rms for backward (the decomposed
    `F.rms_norm` of torch on CPU also keeps x/rms and x*w)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = _at_least_fp32(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = _at_least_fp32(x) * rstd
        g = _at_least_fp32(grad)
        grad_w = (g * xhat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gw = g * _at_least_fp32(weight)
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) with a learned scale, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.bias)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def rope_tables(head_dim: int, positions: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [positions, head_dim] (each frequency repeated for both halves, the
    `rotate_half` convention of GPT-NeoX / Hugging Face Llama), fp32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotate_half_transposed(u: torch.Tensor) -> torch.Tensor:
    """The adjoint of `_rotate_half`: (u1, u2) -> (u2, -u1)."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat([u2, -u1], dim=-1)


class _RoPEFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin. The tables are constants held on the autograd context (not saved
    tensors), so neither the unrotated input nor the tables count as activations."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.cos, ctx.sin = cos, sin
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.cos + _rotate_half_transposed(grad * ctx.sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [>= seq, head_dim]. Keeps nothing for backward."""
    s = x.shape[1]
    return _RoPEFunction.apply(x, cos[:s, None, :].to(x.dtype), sin[:s, None, :].to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with separate q, k, v projections (so that each can be
    split column-wise over tensor-parallel ranks) and an output projection (split row-wise)."""

    def __init__(self, spec: ModelSpec, tp_degree: int = 1):
        super().__init__()
        _check_tp(spec, tp_degree)
        self.head_dim = spec.dim_per_head
        self.kernel = spec.attention
        self.dropout_p = spec.dropout
        self.rope = spec.position_embedding == "rope"
        self.rope_theta = spec.rope_theta
        self.max_positions = spec.max_position_embeddings
        self.recompute = "none"
        h, d = spec.hidden_size, spec.dim_per_head
        heads, kv = spec.num_heads // tp_degree, spec.kv_heads // tp_degree
        qkv_bias = spec.has_qkv_bias
        self.q_proj = nn.Linear(h, heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * d, h, bias=spec.bias)
        # RoPE tables (fp32) and the eager kernel's additive causal mask: derived, never saved in checkpoints
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("causal_bias", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | None = None, positions: int = 0) -> None:
        """(Re)compute the RoPE tables for max(`positions`, max_position_embeddings) positions, e.g. after
        `to_empty` from the meta device."""
        if not self.rope:
            return
        if device is None:
            device = self.q_proj.weight.device
        n = max(positions, self.max_positions)
        if device.type == "meta":
            cos = torch.empty(n, self.head_dim, device="meta")
            self.rope_cos, self.rope_sin = cos, torch.empty_like(cos)
            return
        self.rope_cos, self.rope_sin = rope_tables(self.head_dim, n, self.rope_theta, device)

    def _rope(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables for a sequence of `s` tokens. RoPE learns nothing per position, so a sequence
        longer than max_position_embeddings extends the tables (on their device) instead of failing."""
        if self.rope_cos.shape[0] < s:
            self.reset_buffers(self.rope_cos.device, s)
        return self.rope_cos, self.rope_sin

    def _causal_bias(self, s: int, like: torch.Tensor) -> torch.Tensor:
        """[s, s] additive mask (0 on and below the diagonal, -inf above), cached as a buffer."""
        bias = self.causal_bias
        if bias is None or bias.shape[0] != s or bias.dtype != like.dtype or bias.device != like.device:
            bias = torch.full((s, s), float("-inf"), dtype=like.dtype, device=like.device).triu(1)
            self.causal_bias = bias
        return bias

    def _eager_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal) v with dropout on the probabilities; q, k, v: [b, heads, s, d]."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + self._causal_bias(q.shape[-2], scores)
        probs = torch.softmax(scores, dim=-1)
        probs = dropout(probs, self.dropout_p, self.training)
        return torch.matmul(probs, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        # [b, s, heads, d]; the head counts are those of this (possibly tensor-parallel) shard, and s is
        # the full sequence even under sequence parallelism (the projections gather it)
        q = self.q_proj(x)
        q = q.view(q.shape[0], q.shape[1], -1, d)
        k = self.k_proj(x)
        k = k.view(k.shape[0], k.shape[1], -1, d)
        v = self.v_proj(x)
        v = v.view(v.shape[0], v.shape[1], -1, d)
        if self.rope:
            cos, sin = self._rope(q.shape[1])
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        heads, kv = q.shape[2], k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # [b, heads, s, d]
        p = self.dropout_p if self.training else 0.0
        if self.kernel == "flash":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=kv < heads)
        else:
            if kv < heads:
                k = k.repeat_interleave(heads // kv, dim=1)
                v = v.repeat_interleave(heads // kv, dim=1)
            if self.recompute == "selective" and torch.is_grad_enabled():
                out = checkpoint(self._eager_core, q, k, v, use_reentrant=False)
            else:
                out = self._eager_core(q, k, v)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)   # [b, s, heads * d]
        return self.o_proj(out)


# ----------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward (silu is recomputed)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad_up


class MLP(nn.Module):
    """GELU (fc1 -> gelu(tanh) -> fc2, GPT-2) or SwiGLU (down(silu(gate) * up), Llama)."""

    def __init__(self, spec: ModelSpec, tp_degree: int = 1):
        super().__init__()
        _check_tp(spec, tp_degree)
        h, f = spec.hidden_size, spec.ffn_size // tp_degree
        self.swiglu = spec.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(h, f, bias=spec.bias)
            self.up_proj = nn.Linear(h, f, bias=spec.bias)
            self.down_proj = nn.Linear(f, h, bias=spec.bias)
        else:
            self.fc1 = nn.Linear(h, f, bias=spec.bias)
            self.fc2 = nn.Linear(f, h, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(spec: ModelSpec, layer_id: int, tp_degree: int = 1, ep_group=None) -> nn.Module:
    """The MLP of layer `layer_id`: runtime.moe.MoEMLP for a mixture-of-experts layer of the spec (its experts
    sharded over `ep_group`, a torch.distributed process group, when given), the dense MLP otherwise; at the
    local shapes of one TP shard for `tp_degree` > 1."""
    moe = spec.moe
    if moe is None or not moe.is_moe_layer(layer_id):
        return MLP(spec, tp_degree)
    from runtime.moe import MoEMLP     # runtime.moe imports this module
    return MoEMLP(spec.hidden_size, moe.expert_ffn_size, moe.num_experts, moe.top_k, moe.shared_width, ep_group,
                  tp_degree)


# ----------------------------------------------------------------------------------------------
# Block, embedding, head
# ----------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + drop(attn(norm1(x))), then + drop(mlp(norm2(.))).

    x: [batch, seq, hidden] -> [batch, seq, hidden]. `recompute` in {"none", "selective", "full"} may also
    be changed later through the attribute of the same name. `layer_id` is the block's global index in the
    model (used for its initialisation and its name in checkpoints).
    """

    def __init__(self, spec: ModelSpec, tp_degree: int = 1, layer_id: int = 0, recompute: str = "none",
                 ep_group=None):
        super().__init__()
        _check_tp(spec, tp_degree)
        self.layer_id = layer_id
        self.num_layers = spec.num_layers
        self.dropout_p = spec.dropout
        self.norm1 = make_norm(spec)
        self.attn = Attention(spec, tp_degree)
        self.norm2 = make_norm(spec)
        self.mlp = make_mlp(spec, layer_id, tp_degree, ep_group)
        self.recompute = recompute
        if not _on_meta(self):
            init_weights(self, seed=0, prefix=f"layers.{layer_id}.")

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)} (got {mode!r})")
        self._recompute = mode
        self.attn.recompute = mode

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + dropout(self.attn(self.norm1(x)), self.dropout_p, self.training)
        return h + dropout(self.mlp(self.norm2(h)), self.dropout_p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def vocab_rows(spec: ModelSpec, tp_degree: int, vocab_tp: int | None) -> int:
    """Rows of the embedding / columns of the LM head on one shard of `tp_degree`: the vocabulary padded for
    tensor-parallel degree `vocab_tp` (default `tp_degree`), divided by `tp_degree`."""
    return padded_vocab_size(spec, vocab_tp or tp_degree) // tp_degree


class Embedding(nn.Module):
    """Token embedding (padded vocab/tp rows on one TP shard) plus learned positions when the spec has them,
    and dropout: tokens [batch, seq] int64 -> [batch, seq, hidden]. `vocab_tp`: the TP degree the vocabulary
    is padded for, when the whole module is built to be sharded later (runtime.parallelize)."""

    def __init__(self, spec: ModelSpec, tp_degree: int = 1, vocab_tp: int | None = None):
        super().__init__()
        _check_tp(spec, tp_degree)
        self.vocab_size = spec.vocab_size
        # `_weight` skips nn.Embedding's own normal_ init (init_weights sets the values; on the meta device
        # that init would import torch._dynamo, seconds of start-up)
        v, h = vocab_rows(spec, tp_degree, vocab_tp), spec.hidden_size
        self.tok = nn.Embedding(v, h, _weight=torch.empty(v, h))
        self.pos = None
        if spec.position_embedding == "learned":
            p = spec.max_position_embeddings
            self.pos = nn.Embedding(p, h, _weight=torch.empty(p, h))
        self.drop = Dropout(spec.dropout)       # a module: sequence parallelism shards its input
        if not _on_meta(self):
            init_weights(self, seed=0, prefix="embed.")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.drop(x)


class Dropout(nn.Module):
    """`dropout` as a module (1-byte mask)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class LMHead(nn.Module):
    """Final norm and output projection (padded vocab/tp columns on one TP shard): [batch, seq, hidden] ->
    logits [batch, seq, padded vocab], -inf in the padding columns. Tied embeddings share `proj.weight` with
    `Embedding.tok.weight` (the model assembly ties them). A shard built with `tp_degree > 1` (profiling)
    holds the first shard's columns."""

    def __init__(self, spec: ModelSpec, tp_degree: int = 1, vocab_tp: int | None = None):
        super().__init__()
        _check_tp(spec, tp_degree)
        self.norm = make_norm(spec)
        self.proj = nn.Linear(spec.hidden_size, vocab_rows(spec, tp_degree, vocab_tp), bias=False)
        self.tied = spec.tied_embeddings
        self.vocab_size = spec.vocab_size
        self._mask_cache: tuple | None = None
        if not _on_meta(self):
            init_weights(self, seed=0, prefix="head.", tied=self.tied)

    def _padding_mask(self, logits: torch.Tensor) -> torch.Tensor | None:
        """0 for the real vocabulary, -inf for the padding columns, shaped and sharded like the logits'
        last dimension; None when this module holds no padding column."""
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
        width = logits.shape[-1]                       # global width, also for a vocabulary-sharded DTensor
        if width <= self.vocab_size:
            return None
        key = (width, logits.dtype, logits.device, getattr(logits, "device_mesh", None),
               getattr(logits, "placements", None))
        if self._mask_cache is None or self._mask_cache[0] != key:
            mask = torch.zeros(width, dtype=logits.dtype, device=logits.device)
            mask[self.vocab_size:] = float("-inf")
            if isinstance(logits, DTensor):   # sharded as the logits' columns; each rank slices its own
                last = logits.ndim - 1
                placements = [Shard(0) if p.is_shard() and p.dim in (-1, last) else Replicate()
                              for p in logits.placements]
                mask = distribute_tensor(mask, logits.device_mesh, placements, src_data_rank=None)
            self._mask_cache = (key, mask)
        return self._mask_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.norm(x))
        mask = self._padding_mask(logits)
        return logits if mask is None else logits + mask


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all tokens, computed in fp32. logits [b, s, V], targets [b, s]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class ModelChunk(nn.Module):
    """A contiguous piece of the model: the embedding if `first`, blocks `layer_ids` (kept in a ModuleDict
    keyed by global layer index, so parameter names are the same in every layout) and the head if `last`,
    with the vocabulary padded for tensor-parallel degree `vocab_tp`.

    Input: token ids [b, s] (first chunk) or activations [b, s, h]; output: activations or logits.
    With `first` and `last` and tied embeddings the head shares the embedding's weight.
    """

    def __init__(self, spec: ModelSpec, layer_ids: list[int], first: bool, last: bool, recompute: str = "none",
                 vocab_tp: int = 1, ep_group=None):
        super().__init__()
        self.spec = spec
        self.first, self.last = first, last
        self.embed = Embedding(spec, vocab_tp=vocab_tp) if first else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(spec, 1, i, recompute, ep_group) for i in layer_ids})
        self.head = LMHead(spec, vocab_tp=vocab_tp) if last else None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head's projection with the token embedding when both live here and the spec ties
        them."""
        if self.spec.tied_embeddings and self.embed is not None and self.head is not None:
            self.head.proj.weight = self.embed.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.layers.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


def build_model(spec: ModelSpec, seed: int = 0, recompute: str = "none") -> ModelChunk:
    """The whole model in one piece on the current default device, initialised from `seed`."""
    model = ModelChunk(spec, list(range(spec.num_layers)), first=True, last=True, recompute=recompute)
    init_weights(model, seed)
    return model


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------
def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _init_spec(name: str, num_layers: int) -> tuple[str, float]:
    """('normal', std) / ('ones', 0) / ('zeros', 0) for a parameter of global name `name`.

    GPT-2 / Megatron: weights N(0, 0.02); the output projections of attention and MLP N(0, 0.02/sqrt(2L));
    biases zero; norm scales one.
    """
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if owner.startswith("norm"):
        return ("ones", 0.0) if leaf == "weight" else ("zeros", 0.0)
    if leaf == "bias":
        return "zeros", 0.0
    # "down": a MoE layer's shared expert ('mlp.shared.down.weight'); its routed experts' 'mlp.experts.down'
    if owner in ("o_proj", "fc2", "down_proj", "down") or (owner == "experts" and leaf == "down"):
        return "normal", INIT_STD / math.sqrt(2 * num_layers)
    return "normal", INIT_STD


VOCAB_MATRICES = ("embed.tok.weight", "head.proj.weight")


def init_value(name: str, shape: tuple[int, ...], seed: int, num_layers: int, device=None,
               dtype=torch.float32, vocab: int | None = None) -> torch.Tensor:
    """The initial value of the parameter `name` (global name, e.g. 'layers.3.attn.q_proj.weight') of the
    full, unsharded model, drawn from a generator seeded by (seed, name) alone. A vocabulary matrix with more
    rows than `vocab` (padded) holds the unpadded matrix's values and zeros in the padding rows."""
    if vocab is not None and name.endswith(VOCAB_MATRICES) and shape[0] > vocab:
        real = init_value(name, (vocab, *shape[1:]), seed, num_layers, device, dtype)
        return torch.cat([real, torch.zeros((shape[0] - vocab, *shape[1:]), device=real.device, dtype=dtype)])
    kind, std = _init_spec(name, num_layers)
    if kind == "ones":
        return torch.ones(shape, device=device, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, device=device, dtype=dtype)
    gen_device = torch.device(device) if device is not None else torch.device("cpu")
    if gen_device.type not in ("cpu", "cuda"):
        gen_device = torch.device("cpu")
    gen = torch.Generator(device=gen_device)
    gen.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    out = torch.empty(shape, device=gen_device, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return out.to(device=device, dtype=dtype)


def init_weights(module: nn.Module, seed: int, prefix: str = "", tied: bool | None = None,
                 num_layers: int | None = None) -> None:
    """Set every parameter of `module` (names relative to it, `prefix` makes them global) to its
    deterministic initial value. Sharded parameters (DTensors from tensor parallelism or FSDP) get their
    slice of the full value, so any layout starts from the same model as a single process.

    `tied`: the head projection takes the token embedding's value (defaults to the spec's setting when the
    module is a ModelChunk or LMHead).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    spec = getattr(module, "spec", None)
    vocab = spec.vocab_size if spec is not None else getattr(module, "vocab_size", None)
    if num_layers is None:
        num_layers = spec.num_layers if spec is not None else getattr(module, "num_layers", 1)
    if tied is None:
        tied = spec.tied_embeddings if spec is not None else getattr(module, "tied", False)
    expert_rows = _expert_rows(module)
    with torch.no_grad():
        for local_name, param in module.named_parameters():
            name = prefix + local_name
            if tied and name.endswith("head.proj.weight"):
                name = name[: -len("head.proj.weight")] + "embed.tok.weight"
            if local_name in expert_rows:      # this EP rank's experts: its rows of the [num_experts, ...] value
                lo, n, total = expert_rows[local_name]
                whole = init_value(name, (total, *param.shape[1:]), seed, num_layers, param.device, param.dtype)
                full = whole[lo:lo + n]
                if isinstance(param, DTensor):
                    full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(full.to_local())
                else:
                    param.copy_(full)
            elif isinstance(param, DTensor):
                full = init_value(name, tuple(param.shape), seed, num_layers, param.device, param.dtype, vocab)
                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(init_value(name, tuple(param.shape), seed, num_layers, param.device, param.dtype,
                                       vocab))


def _expert_rows(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{parameter name relative to `module`: (first expert, experts held, experts in all)} for the routed experts
    of every MoE MLP inside it (an EP rank holds a slice of the experts)."""
    from runtime.moe import MoEMLP
    out = {}
    for mod_name, mod in module.named_modules():
        if isinstance(mod, MoEMLP):
            for leaf in ("gate", "up", "down"):
                name = f"{mod_name}.experts.{leaf}" if mod_name else f"experts.{leaf}"
                out[name] = (mod.rank * mod.local, mod.local, mod.num_experts)
    return out
