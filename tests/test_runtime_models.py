"""runtime.models: parameter counts, what a block keeps for backward, recomputation, shard shapes."""

from __future__ import annotations

import math

import pytest
import torch

from planner.cost.kernels import Dtypes
from planner.cost.memory import block_activation_bytes
from planner.cost.params import total_params
from runtime.models import (Embedding, LMHead, RMSNorm, SwiGLUFunction, TransformerBlock, _RMSNormFunction,
                            _RoPEFunction, build_model, lm_loss, rope_tables)
from tests.runtime_helpers import model_spec


def saved_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages the block's forward saves for backward (saved_tensors_hooks), its
    parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(block.parameters()) + list(block.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    y.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("name,update", [
    ("gpt-tiny", {}), ("llama-tiny", {}), ("llama-tiny", {"tied_embeddings": True, "qkv_bias": True}),
    ("gpt-tiny", {"bias": False, "tied_embeddings": False}),
])
def test_parameter_count_matches_planner(name, update):
    spec = model_spec(name, update)
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == total_params(spec)


CASES = [(m, k, d, r, t)
         for m in ("gpt-tiny", "llama-tiny")
         for k, d in (("flash", 0.0), ("eager", 0.0), ("eager", 0.1))
         for r in ("none", "selective", "full")
         for t in (1, 2)]


@pytest.mark.parametrize("name,kernel,dropout,recompute,tp", CASES)
def test_saved_activations_match_memory_model(name, kernel, dropout, recompute, tp):
    """What a block keeps for backward is exactly planner.cost.memory.block_activation_bytes (fp32, no SP),
    the norms' per-row statistics (LayerNorm mean and 1/std, RMSNorm 1/rms) included."""
    spec = model_spec(name, {"attention_kernel": kernel, "dropout": dropout})
    b, s = 2, 64
    block = TransformerBlock(spec, tp_degree=tp, layer_id=1, recompute=recompute).train()
    x = torch.randn(b, s, spec.hidden_size, requires_grad=True)
    got = saved_bytes(block, x)
    want = block_activation_bytes(spec, b, s, tp, False, recompute, Dtypes.of("fp32"))
    assert got == pytest.approx(want, rel=1e-9), (got, want)


@pytest.mark.parametrize("name,kernel", [("gpt-tiny", "eager"), ("gpt-tiny", "flash"), ("llama-tiny", "eager")])
def test_recomputation_does_not_change_the_numbers(name, kernel):
    spec = model_spec(name, {"attention_kernel": kernel})
    x = torch.randn(2, 16, spec.hidden_size)
    outs = []
    for mode in ("none", "selective", "full"):
        block = TransformerBlock(spec, layer_id=3, recompute=mode)
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in block.parameters()]))
    for y, gx, gp in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(gx, outs[0][1], rtol=1e-6, atol=1e-7)
        for a, b in zip(gp, outs[0][2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tensor_parallel_shard_shapes():
    spec = model_spec("llama-tiny")       # 4 heads, 2 kv heads, head_dim 16, ffn 176
    block = TransformerBlock(spec, tp_degree=2)
    shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert shapes["attn.q_proj.weight"] == (2 * 16, 64)
    assert shapes["attn.k_proj.weight"] == (1 * 16, 64)
    assert shapes["attn.o_proj.weight"] == (64, 2 * 16)
    assert shapes["mlp.gate_proj.weight"] == (88, 64)
    assert shapes["mlp.down_proj.weight"] == (64, 88)
    assert block(torch.randn(2, 8, 64)).shape == (2, 8, 64)
    assert Embedding(spec, 2).tok.weight.shape == (256, 64)
    assert LMHead(spec, 2)(torch.randn(2, 8, 64)).shape == (2, 8, 256)
    with pytest.raises(ValueError, match="does not divide"):
        TransformerBlock(spec, tp_degree=4)       # 2 kv heads


def test_custom_autograd_functions_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.double, requires_grad=True)
    cos, sin = rope_tables(8, 16, 10000.0)
    c, s = cos.double()[:5, None], sin.double()[:5, None]
    assert torch.autograd.gradcheck(lambda t: _RoPEFunction.apply(t, c, s), (x,))
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    g = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    u = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (g, u))


def test_rmsnorm_and_rope_match_torch_references():
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(RMSNorm(64, 1e-5)(x), torch.nn.functional.rms_norm(x, (64,), eps=1e-5))
    # RoPE by complex multiplication on (x_i, x_{i + d/2}) pairs (the rotate_half convention)
    q = torch.randn(1, 5, 2, 8)
    cos, sin = rope_tables(8, 5, 10000.0)
    got = _RoPEFunction.apply(q, cos[:, None], sin[:, None])
    z = torch.complex(q[..., :4], q[..., 4:])
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).double() / 8))
    angle = torch.outer(torch.arange(5).double(), inv)
    rot = z * torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None, :]
    torch.testing.assert_close(got, torch.cat([rot.real, rot.imag], dim=-1), rtol=1e-5, atol=1e-6)


def test_rope_model_runs_sequences_longer_than_max_position_embeddings():
    """RoPE learns nothing per position: a model with max_position_embeddings 16 trains on 40 tokens, its
    tables extended to the rotation angles p / theta^(2j/d) of every position, and computes what the same
    weights with room for 64 positions compute."""
    short = build_model(model_spec("llama-tiny", {"max_position_embeddings": 16}), seed=1)
    roomy = build_model(model_spec("llama-tiny", {"max_position_embeddings": 64}), seed=1)
    tokens = torch.randint(0, 512, (2, 41))
    logits = short(tokens[:, :-1])
    torch.testing.assert_close(logits, roomy(tokens[:, :-1]), rtol=0, atol=0)
    lm_loss(logits, tokens[:, 1:]).backward()
    assert all(torch.isfinite(p.grad).all() for p in short.parameters())
    attn = short.layers["0"].attn
    d = attn.head_dim
    angle = torch.arange(40, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, d, 2) / d)[None, :]
    torch.testing.assert_close(attn.rope_cos[:40], torch.cat([angle.cos(), angle.cos()], -1).float())
    torch.testing.assert_close(attn.rope_sin[:40], torch.cat([angle.sin(), angle.sin()], -1).float())


def test_initial_loss_is_log_vocab_and_init_is_deterministic():
    spec = model_spec("gpt-tiny")
    a, b = build_model(spec, seed=3), build_model(spec, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(build_model(spec, seed=4).layers["0"].attn.q_proj.weight, a.layers["0"].attn.q_proj.weight)
    tokens = torch.randint(0, spec.vocab_size, (4, 33))
    loss = lm_loss(a(tokens[:, :-1]), tokens[:, 1:]).item()
    assert abs(loss - math.log(spec.vocab_size)) < 0.1
    # a block built alone (as the profiler does) starts from its layer's values in the whole model
    alone = TransformerBlock(spec, layer_id=2)
    for n, p in alone.named_parameters():
        assert torch.equal(p, dict(build_model(spec, seed=0).named_parameters())[f"layers.2.{n}"]), n


def test_dropout_only_in_training():
    spec = model_spec("gpt-tiny", {"dropout": 0.5, "attention_kernel": "eager"})
    block = TransformerBlock(spec)
    x = torch.randn(2, 8, 64)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    assert not torch.equal(block(x), block(x))
