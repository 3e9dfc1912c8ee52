"""The independent single-process reference every parallel layout must reproduce: a plain PyTorch decoder
written here from the ModelSpec, with no code from `runtime/` but the deterministic initial values
(`runtime.models.init_value`, the definition of the starting point) and the data (`runtime.data.TokenData`).

GPT-2 style (LayerNorm, learned positions, tanh GELU, biases) or Llama style (RMSNorm, rotate-half RoPE,
grouped-query attention, SwiGLU) as the spec says; with tied embeddings the LM head *is* the token embedding
(one nn.Parameter, so the optimizer updates it once). Trained with torch.optim on the whole global batch in
one forward, fp32, no dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from planner.specs import ModelSpec


class _Norm(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.rms, self.eps = spec.norm == "rmsnorm", spec.norm_eps
        self.weight = nn.Parameter(torch.ones(spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size)) if spec.bias and not self.rms else None

    def forward(self, x):
        if self.rms:   # Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps) * w
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


def _rope(x, theta: float):
    """x [b, heads, s, d] rotated by position (GPT-NeoX / Hugging Face Llama rotate-half convention)."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.dim_per_head
        self.spec = spec
        self.norm1, self.norm2 = _Norm(spec), _Norm(spec)
        qkv_bias = spec.has_qkv_bias
        self.q = nn.Linear(h, spec.num_heads * d, bias=qkv_bias)
        self.k = nn.Linear(h, spec.kv_heads * d, bias=qkv_bias)
        self.v = nn.Linear(h, spec.kv_heads * d, bias=qkv_bias)
        self.o = nn.Linear(spec.num_heads * d, h, bias=spec.bias)
        f = spec.ffn_size
        if spec.mlp == "swiglu":
            self.gate, self.up, self.down = (nn.Linear(h, f, bias=spec.bias), nn.Linear(h, f, bias=spec.bias),
                                             nn.Linear(f, h, bias=spec.bias))
        else:
            self.fc1, self.fc2 = nn.Linear(h, f, bias=spec.bias), nn.Linear(f, h, bias=spec.bias)

    def attention(self, x):
        spec, (b, s, _) = self.spec, x.shape
        d = spec.dim_per_head
        q = self.q(x).view(b, s, spec.num_heads, d).transpose(1, 2)
        k = self.k(x).view(b, s, spec.kv_heads, d).transpose(1, 2)
        v = self.v(x).view(b, s, spec.kv_heads, d).transpose(1, 2)
        if spec.position_embedding == "rope":
            q, k = _rope(q, spec.rope_theta), _rope(k, spec.rope_theta)
        group = spec.num_heads // spec.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, -1))

    def mlp(self, x):
        if self.spec.mlp == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceGPT(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab_size] (the real vocabulary: no padding here)."""

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        if spec.dropout:
            raise ValueError("the reference runs without dropout")
        h = spec.hidden_size
        self.spec = spec
        self.tok = nn.Parameter(torch.empty(spec.vocab_size, h))
        self.pos = nn.Parameter(torch.empty(spec.max_position_embeddings, h)) \
            if spec.position_embedding == "learned" else None
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.num_layers))
        self.final_norm = _Norm(spec)
        self.head = self.tok if spec.tied_embeddings else nn.Parameter(torch.empty(spec.vocab_size, h))
        self._init(seed)

    def _runtime_names(self):
        """(parameter, the runtime's global name for its initial value) for every parameter."""
        rename = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2", "norm1": "norm1", "norm2": "norm2"}
        yield self.tok, "embed.tok.weight"
        if self.pos is not None:
            yield self.pos, "embed.pos.weight"
        for i, block in enumerate(self.blocks):
            for name, p in block.named_parameters():
                owner, leaf = name.split(".")
                yield p, f"layers.{i}.{rename[owner]}.{leaf}"
        for name, p in self.final_norm.named_parameters():
            yield p, f"head.norm.{name}"
        if not self.spec.tied_embeddings:
            yield self.head, "head.proj.weight"

    def _init(self, seed: int) -> None:
        from runtime.models import init_value
        with torch.no_grad():
            for p, name in self._runtime_names():
                p.copy_(init_value(name, tuple(p.shape), seed, self.spec.num_layers))

    def forward(self, tokens):
        x = self.tok[tokens]
        if self.pos is not None:
            x = x + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.head.t()


def reference_optimizer(params, optimizer: str, lr: float):
    """The optimizers with the hyperparameters the README documents (written out here, so that a wrong one
    in the runtime shows)."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def reference_losses(spec: ModelSpec, global_batch: int, seq: int, steps: int, seed: int = 0, lr: float = 1e-3,
                     optimizer: str = "adamw", data: str | None = None, data_dtype: str = "uint16") -> list[float]:
    """The loss of each step of the single-process reference run: mean token cross entropy over the global
    batch."""
    from runtime.data import TokenData

    torch.manual_seed(seed)
    model = ReferenceGPT(spec, seed)
    opt = reference_optimizer(model.parameters(), optimizer, lr)
    batches = TokenData(seed, global_batch, seq, spec.vocab_size, data, data_dtype)
    losses = []
    for step in range(1, steps + 1):
        tokens = torch.from_numpy(batches.global_batch(step))
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
