"""Parameter and FLOP counts against published numbers and Megatron's formulas."""

from __future__ import annotations

import pytest

from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.params import total_params
from planner.loaders import load_model
from planner.presets import PRESETS
from planner.specs import ModelSpec
from tests.conftest import DATA


def megatron_params(L: int, h: int, V: int, s: int) -> float:
    """Narayanan et al. SC21 (arXiv:2104.04473) Sec. 5.1: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h))."""
    return 12 * L * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * L * h))


def test_gpt3_175b_matches_megatron_formula():
    m = PRESETS["gpt3-175b"]
    formula = megatron_params(96, 12288, 51200, 2048)
    assert round(formula / 1e9, 1) == 174.6
    # the formula leaves out the final LayerNorm (2h)
    assert total_params(m) == pytest.approx(formula + 2 * 12288, rel=1e-12)


@pytest.mark.parametrize("name,published", [
    ("llama3-8b", 8_030_261_248),       # Meta-Llama-3-8B safetensors index / model card (8.03B)
    ("llama3-70b", 70_553_706_496),     # Meta-Llama-3-70B (70.6B)
    ("llama3-405b", 405_853_388_800),   # Llama-3.1-405B (405B)
    ("llama3.2-1b", 1_235_814_400),     # Llama-3.2-1B (1.23B)
    ("llama3.2-3b", 3_212_749_824),     # Llama-3.2-3B (3.21B)
    ("mistral-7b", 7_241_732_096),      # Mistral-7B-v0.1 (7.24B)
])
def test_published_llama_family_counts(name, published):
    assert total_params(PRESETS[name]) == published


@pytest.mark.parametrize("file,published", [
    ("gpt2_config.json", 124_439_808),      # GPT-2 small (124M), tied embeddings
    ("llama3_8b_config.json", 8_030_261_248),
    ("qwen2_0.5b_config.json", 494_032_768),  # Qwen2-0.5B, q/k/v biases, tied
])
def test_hf_config_files(file, published):
    assert total_params(load_model(str(DATA / file))) == published


GPT_CASES = [  # (layers, hidden, heads, vocab, seq, global batch): SC21 Table 1 rows and small models
    (96, 12288, 96, 51200, 2048, 1536),
    (128, 25600, 160, 51200, 2048, 3072),
    (24, 2048, 16, 51200, 2048, 512),
    (12, 1024, 16, 51200, 1024, 8),
]


@pytest.mark.parametrize("L,h,a,V,s,B", GPT_CASES)
def test_megatron_iteration_flops(L, h, a, V, s, B):
    """Megatron's iteration FLOPs with full recompute: 96 B s l h^2 (1 + s/(6h) + V/(16 l h)); without
    recompute 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) (SC21 Sec. 5.1, Appendix)."""
    m = ModelSpec(num_layers=L, hidden_size=h, num_heads=a, vocab_size=V, max_position_embeddings=s)
    with_recompute = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    without = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert hardware_flops_per_step(m, B, s, full_recompute=True) == pytest.approx(with_recompute, rel=1e-12)
    assert model_flops_per_step(m, B, s) == pytest.approx(without, rel=1e-12)
