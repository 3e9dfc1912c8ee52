"""Mixture-of-experts and the newer architectures' specs: parameter counts against the published ones, FLOPs per
token against an independent count of the matmuls a token passes through, and the Hugging Face importer's rule
(every key modelled, neutral or refused in one line)."""

import json
from pathlib import Path

import pytest

from planner.cost.flops import model_flops_per_step
from planner.cost.params import active_params, total_params
from planner.errors import InputError
from planner.loaders import load_model
from planner.presets import PRESETS
from tests.config_helpers import load_config_dict

DATA = Path(__file__).parent / "data"

# Published counts (total, active), billions: Mixtral paper (arXiv:2401.04088) 46.7B / 12.9B; Qwen3 report
# (arXiv:2505.09388) Table 2: 30.5B / 3.3B, 235B / 22B, Qwen3-8B 8.2B; Gemma 2 report (arXiv:2408.00118):
# 9.24B; Qwen1.5-MoE-A2.7B blog: 14.3B / 2.7B; Llama 4 Scout model card: 17B active; Gemma 3 1B: 1B.
PUBLISHED = [
    ("mixtral-8x7b", "mixtral_config.json", 46.7, 12.9),
    ("qwen3-30b-a3b", "qwen3_30b_a3b_config.json", 30.5, 3.3),
    ("qwen3-8b", "qwen3_8b_config.json", 8.2, 8.2),
    ("gemma2-9b", "gemma2_9b_config.json", 9.24, 9.24),
    ("qwen3-235b-a22b", None, 235, 22),
    (None, "qwen1.5_moe_a2.7b_config.json", 14.3, 2.7),
    (None, "gemma3_1b_config.json", 1.0, 1.0),
]


@pytest.mark.parametrize("preset,config,total,active", PUBLISHED)
def test_parameter_counts_match_the_published_ones(preset, config, total, active):
    """Within one unit of the published figure's last digit (Qwen3-30B-A3B's 3.35B active is published as 3.3B,
    truncated)."""
    def unit(x: float) -> float:
        return 10.0 ** -len(str(x).split(".")[1]) if "." in str(x) else 1.0
    specs = ([PRESETS[preset]] if preset else []) + ([load_model(str(DATA / config))] if config else [])
    for m in specs:
        assert abs(total_params(m) / 1e9 - total) < unit(total)
        assert abs(active_params(m) / 1e9 - active) < unit(active)


def test_llama4_scout_text_active_parameters():
    """17B active (the model card); the total, 109B there, includes the vision encoder this text model lacks."""
    m = load_model(str(DATA / "llama4_scout_text_config.json"))
    assert active_params(m) / 1e9 == pytest.approx(17.17, abs=0.01)
    assert m.moe.shared_experts == 1 and m.moe.top_k == 1 and m.qk_norm == "l2"


def _matmul_params_per_token(cfg: dict, experts_per_token: int, expert_width: int) -> int:
    """Weights of the matmuls one token passes through, counted from the config's numbers alone: q, k, v, o,
    router, the routed experts it uses (gate, up, down), and the LM head."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    per_layer = h * q + 2 * h * kv + q * h + h * experts + experts_per_token * 3 * h * expert_width
    return L * per_layer + cfg["vocab_size"] * h


@pytest.mark.parametrize("config,k_key,width_key", [
    ("mixtral_config.json", "num_experts_per_tok", "intermediate_size"),
    ("qwen3_30b_a3b_config.json", "num_experts_per_tok", "moe_intermediate_size"),
    ("qwen3_8b_config.json", None, "intermediate_size"),
])
def test_flops_per_token_are_six_active_matmul_parameters_plus_attention(config, k_key, width_key):
    """Training FLOPs per token = 6 x the weights a token multiplies + 3 x 4 s (heads x head_dim) per layer
    for QK^T and PV over the full s x s matrix (the Megatron / Llama 3 convention)."""
    cfg = json.loads((DATA / config).read_text())
    m = load_model(str(DATA / config))
    seq = 4096
    k = cfg[k_key] if k_key else 1
    weights = _matmul_params_per_token(cfg, k, cfg[width_key])
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    attention = 3 * 4 * seq * cfg["num_attention_heads"] * d * cfg["num_hidden_layers"]
    assert model_flops_per_step(m, 1, seq) / seq == pytest.approx(6 * weights + attention, rel=1e-12)


def test_sliding_window_counts_the_window_in_windowed_layers():
    """Gemma 2 at s = 8192: 21 layers attend to 4096 keys, 21 to all 8192 (the full band counted)."""
    m = PRESETS["gemma2-9b"]
    seq, d, a, L = 8192, 256, 16, 42
    dense = m.model_copy(update={"sliding_window": None, "global_every": None})
    saved = 3 * 4 * a * d * (seq - 4096) * (L // 2)          # per token
    assert (model_flops_per_step(dense, 1, seq) - model_flops_per_step(m, 1, seq)) / seq == pytest.approx(saved)
    assert m.num_windowed_layers == 21



@pytest.mark.parametrize("change,message", [
    ({"some_new_key": 3}, "'some_new_key': not a key meshplan knows for model_type 'mixtral'"),
    ({"use_sliding_window": True, "model_type": "qwen3_moe", "num_experts": 8, "moe_intermediate_size": 64},
     "'use_sliding_window': Qwen's windowed layers"),
    ({"vision_config": {}}, "'vision_config': a multimodal config"),
    ({"quantization_config": {"bits": 4}}, "'quantization_config': quantized weights"),
    ({"model_type": "phi3"}, "'model_type': 'phi3' is not one meshplan imports"),
    ({"kv_lora_rank": 512}, "'kv_lora_rank': multi-head latent attention is modelled for deepseek_v2 and "
                            "deepseek_v3 configs, not model_type 'mixtral'"),
])
def test_hf_keys_that_change_the_model_are_modelled_or_refused(tmp_path, change, message):
    cfg = {**json.loads((DATA / "mixtral_config.json").read_text()), **change}
    with pytest.raises(InputError, match=message):
        load_config_dict(tmp_path, cfg)


def test_mixtral_is_no_longer_a_dense_model(tmp_path):
    """The issue's report: Mixtral's config planned as a dense 7.24B model."""
    m = load_model(str(DATA / "mixtral_config.json"))
    assert m.moe is not None and m.moe.num_experts == 8 and m.moe.top_k == 2
    assert total_params(m) > 6 * 7.24e9


def test_mistral_sliding_window_is_modelled(tmp_path):
    cfg = json.loads((DATA / "llama3_8b_config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=4096, vocab_size=32000)
    m = load_config_dict(tmp_path, cfg)
    assert m.sliding_window == 4096 and m.num_windowed_layers == 32


def test_moe_layer_pattern(tmp_path):
    cfg = {**json.loads((DATA / "qwen3_30b_a3b_config.json").read_text()), "mlp_only_layers": [0, 1],
           "decoder_sparse_step": 2}
    m = load_config_dict(tmp_path, cfg)
    assert [i for i in range(m.num_layers) if m.moe.is_moe_layer(i)] == list(range(3, 48, 2))
    cfg["mlp_only_layers"] = [5]
    with pytest.raises(InputError, match="'mlp_only_layers'"):
        load_config_dict(tmp_path, cfg)
