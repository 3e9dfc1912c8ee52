"""Built-in model presets, from each model's published configuration.

GPT-3: Brown et al. 2020 (arXiv:2005.14165) Table 2.1, with Megatron's padded GPT-2 vocabulary of 51,200
(Narayanan et al. SC21, arXiv:2104.04473). Llama 3 / 3.1 / 3.2: Meta's published config.json files.
Mistral 7B: Jiang et al. 2023 (arXiv:2310.06825) Table 1. Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088
Table 1), Qwen3 (Qwen3 technical report, arXiv:2505.09388, Tables 1-2) and Gemma 2 (arXiv:2408.00118 Table 1):
the published config.json files. DeepSeek-V3 (arXiv:2412.19437 Sec. 4.2 and its config.json; multi-token
prediction module excluded, as the published 671B is). Presets leave the attention kernel to the engine (`--engine`).
"""

from __future__ import annotations

from planner.specs import MLASpec, ModelSpec, MoESpec


def _gpt(name: str, layers: int, hidden: int, heads: int, **extra) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=51200,
                     max_position_embeddings=2048, tied_embeddings=True, norm="layernorm", mlp="gelu",
                     bias=True, position_embedding="learned", dropout=0.1, **extra)


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int = 128256,
           tied: bool = False, max_pos: int = 8192, theta: float = 500000.0, eps: float = 1e-5) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                     ffn_hidden_size=ffn, vocab_size=vocab, max_position_embeddings=max_pos,
                     tied_embeddings=tied, norm="rmsnorm", mlp="swiglu", bias=False,
                     position_embedding="rope", rope_theta=theta, norm_eps=eps, dropout=0.0)


def _qwen3(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int,
           moe: MoESpec | None = None) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=128, ffn_hidden_size=ffn, vocab_size=151936, max_position_embeddings=40960,
                     tied_embeddings=False, norm="rmsnorm", mlp="swiglu", bias=False, qk_norm="rmsnorm",
                     position_embedding="rope", rope_theta=1e6, norm_eps=1e-6, dropout=0.0, moe=moe)


PRESETS: dict[str, ModelSpec] = {
    m.name: m for m in [
        _gpt("gpt3-1.3b", 24, 2048, 16),
        _gpt("gpt3-2.7b", 32, 2560, 32),
        _gpt("gpt3-6.7b", 32, 4096, 32),
        _gpt("gpt3-13b", 40, 5120, 40),
        _gpt("gpt3-175b", 96, 12288, 96),
        # The 1T GPT of Narayanan et al. SC21 Table 1 (128 layers, h 25600, 160 heads).
        _gpt("gpt-1t", 128, 25600, 160),
        _llama("llama3-8b", 32, 4096, 32, 8, 14336),
        _llama("llama3-70b", 80, 8192, 64, 8, 28672),
        _llama("llama3-405b", 126, 16384, 128, 8, 53248),
        _llama("llama3.2-1b", 16, 2048, 32, 8, 8192, tied=True),
        _llama("llama3.2-3b", 28, 3072, 24, 8, 8192, tied=True),
        _llama("mistral-7b", 32, 4096, 32, 8, 14336, vocab=32000, max_pos=32768, theta=10000.0),
        ModelSpec(name="mixtral-8x7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                  ffn_hidden_size=14336, vocab_size=32000, max_position_embeddings=32768, tied_embeddings=False,
                  norm="rmsnorm", mlp="swiglu", bias=False, position_embedding="rope", rope_theta=1e6,
                  dropout=0.0, moe=MoESpec(num_experts=8, top_k=2, expert_ffn_size=14336)),
        _qwen3("qwen3-8b", 36, 4096, 32, 8, 12288),
        _qwen3("qwen3-30b-a3b", 48, 2048, 32, 4, 6144, MoESpec(num_experts=128, top_k=8, expert_ffn_size=768)),
        _qwen3("qwen3-235b-a22b", 94, 4096, 64, 4, 12288, MoESpec(num_experts=128, top_k=8, expert_ffn_size=1536)),
        ModelSpec(name="deepseek-v3", num_layers=61, hidden_size=7168, num_heads=128, ffn_hidden_size=18432,
                  vocab_size=129280, max_position_embeddings=163840, tied_embeddings=False, norm="rmsnorm",
                  mlp="swiglu", bias=False, position_embedding="rope", rope_theta=10000.0, norm_eps=1e-6,
                  dropout=0.0,
                  mla=MLASpec(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                              v_head_dim=128),
                  moe=MoESpec(num_experts=256, top_k=8, expert_ffn_size=2048, shared_experts=1,
                              first_dense_layers=3, router="sigmoid")),
        ModelSpec(name="gemma2-9b", num_layers=42, hidden_size=3584, num_heads=16, num_kv_heads=8, head_dim=256,
                  ffn_hidden_size=14336, vocab_size=256000, max_position_embeddings=8192, tied_embeddings=True,
                  norm="rmsnorm", mlp="geglu", bias=False, sandwich_norm=True, sliding_window=4096,
                  global_every=2, position_embedding="rope", rope_theta=10000.0, norm_eps=1e-6, dropout=0.0),
        # Small models for CPU tests and demos of the runtime.
        ModelSpec(name="gpt-tiny", num_layers=4, hidden_size=64, num_heads=4, vocab_size=512,
                  max_position_embeddings=256, dropout=0.0),
        _llama("llama-tiny", 4, 64, 4, 2, 176, vocab=512, tied=False, max_pos=256, theta=10000.0),
        # layer 0 dense, layers 1-3 route to 2 of 4 experts and pass a shared expert
        ModelSpec(**{**_llama("moe-tiny", 4, 64, 4, 2, 176, vocab=512, tied=False, max_pos=256,
                              theta=10000.0).model_dump(), "name": "moe-tiny",
                     "moe": MoESpec(num_experts=4, top_k=2, expert_ffn_size=64, shared_experts=1, shared_ffn_size=32,
                                    first_dense_layers=1)}),
    ]
}
