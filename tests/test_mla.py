"""Multi-head latent attention (DeepSeek-V2/V3): parameter counts against the published ones, FLOPs per token and
kernels against a count from the config's numbers alone, kept activations against a hand count, the importer's
keys, and the one-line refusals of what does not run it."""

import json
from pathlib import Path

import pytest

from planner.cost.flops import model_flops_per_step
from planner.cost.kernels import MEGATRON, Dtypes, block_work
from planner.cost.memory import block_activation_bytes
from planner.cost.params import active_params, total_params
from planner.errors import InputError
from planner.loaders import load_model
from planner.presets import PRESETS
from planner.specs import MLASpec, ModelSpec
from tests.config_helpers import load_config_dict

DATA = Path(__file__).parent / "data"

# Published (total, activated) billions: DeepSeek-V3 report (arXiv:2412.19437) abstract: 671B / 37B (the 14B
# multi-token prediction module excluded, Sec. 4.2); DeepSeek-V2 paper (arXiv:2405.04434) abstract: 236B / 21B,
# and its Appendix B: DeepSeek-V2-Lite 15.7B / 2.4B. DeepSeek counts activated parameters without the input
# embedding (a lookup, no matmul): V2-Lite's 2.4B fits only that count (2.45B; 2.66B with it), so the test takes the
# embedding out of meshplan's active_params, which counts it as Mixtral's and Qwen's published figures do.
PUBLISHED = [
    ("deepseek_v3_config.json", 671, 37),
    ("deepseek_v2_config.json", 236, 21),
    ("deepseek_v2_lite_config.json", 15.7, 2.4),
]


def _unit(x: float) -> float:
    return 10.0 ** -len(str(x).split(".")[1]) if "." in str(x) else 1.0


@pytest.mark.parametrize("config,total,active", PUBLISHED)
def test_parameter_counts_match_the_published_ones(config, total, active):
    m = load_model(str(DATA / config))
    assert abs(total_params(m) / 1e9 - total) < _unit(total)
    assert abs((active_params(m) - m.vocab_size * m.hidden_size) / 1e9 - active) < _unit(active)


def test_the_preset_is_the_public_config():
    preset, imported = PRESETS["deepseek-v3"], load_model(str(DATA / "deepseek_v3_config.json"))
    assert total_params(preset) == total_params(imported) and active_params(preset) == active_params(imported)
    assert preset.mla == imported.mla and preset.moe.router == imported.moe.router == "sigmoid"


def _latent_attention_weights(cfg: dict) -> tuple[int, int]:
    """(matrix weights, norm weights) of one block's attention from the config's numbers (V3 eqs. 1-11)."""
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, c, cq = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank",
                                             "q_lora_rank"))
    q = h * cq + cq * n * (nope + rope) if cq else h * n * (nope + rope)    # W^DQ, W^UQ (or W^Q)
    kv = h * (c + rope) + c * n * (nope + v)                                # W^DKV with W^KR, W^UKV
    return q + kv + n * v * h, c + (cq or 0)                                # W^O; latent norms


def _matmul_weights_per_token(cfg: dict) -> int:
    """Weights of the matmuls one token passes through: attention, router, top-k routed and the shared experts'
    gate/up/down in MoE layers, the dense MLP in the first layers, and the LM head."""
    h, layers, dense = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    attention, _ = _latent_attention_weights(cfg)
    moe = h * cfg["n_routed_experts"] + 3 * h * cfg["moe_intermediate_size"] * (
        cfg["num_experts_per_tok"] + cfg["n_shared_experts"])
    return (layers * attention + dense * 3 * h * cfg["intermediate_size"] + (layers - dense) * moe
            + cfg["vocab_size"] * h)


@pytest.mark.parametrize("config", ["deepseek_v3_config.json", "deepseek_v2_lite_config.json"])
def test_flops_per_token_are_six_matmul_weights_plus_latent_attention(config):
    """Training FLOPs per token = 6 x the weights a token multiplies + 3 x 2 s n (d_h + d_h^R + d_v) per layer:
    scores over nope + rope channels, values at v_head_dim, the full s x s matrix counted (Megatron's
    convention)."""
    cfg = json.loads((DATA / config).read_text())
    m, seq = load_model(str(DATA / config)), 4096
    core = 2 * seq * cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
                                                    + cfg["v_head_dim"])
    expected = 6 * _matmul_weights_per_token(cfg) + 3 * core * cfg["num_hidden_layers"]
    assert model_flops_per_step(m, 1, seq) / seq == pytest.approx(expected, rel=1e-12)


def test_v3_attention_weights_per_layer():
    """187.1M per block: W^DQ 11.0M, W^UQ 37.7M, W^DKV+KR 4.1M, W^UKV 16.8M, W^O 117.4M, norms 2,048."""
    weights, norms = _latent_attention_weights(json.loads((DATA / "deepseek_v3_config.json").read_text()))
    assert (weights, norms) == (187_105_280, 2_048)
    m = PRESETS["deepseek-v3"]
    dense = m.model_copy(update={"moe": None})
    assert total_params(dense) == 61 * (weights + norms + 3 * 7168 * 18432 + 2 * 7168) + 2 * 129280 * 7168 + 7168


def _mla_tiny(**update) -> ModelSpec:
    fields = dict(name="mla-tiny", num_layers=2, hidden_size=256, num_heads=8, ffn_hidden_size=512, vocab_size=1000,
                  max_position_embeddings=4096, tied_embeddings=False, norm="rmsnorm", mlp="swiglu", bias=False,
                  position_embedding="rope", dropout=0.0, attention_kernel="flash",
                  mla=MLASpec(kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16,
                              v_head_dim=24))
    return ModelSpec(**{**fields, **update})


@pytest.mark.parametrize("tp,sp", [(1, False), (4, True)])
def test_kernels_split_heads_and_duplicate_the_down_projections(tp, sp):
    """Forward GEMM FLOPs of a block on one TP rank: the up and output projections and the MLP at 1/tp, the down
    projections whole on the rank's sequence shard; the causal flash kernel over half the s x s band; under SP the
    two latents all-gathered before their up projections and the output reduce-scattered."""
    m, mbs, seq = _mla_tiny(), 2, 512
    tokens, h, n, c, cq, nope, rope, v, f = mbs * seq, 256, 8, 64, 96, 32, 16, 24, 512
    local = tokens / tp if sp else tokens
    work = block_work(m, mbs, seq, tp, sp, "none", Dtypes.of("bf16"), MEGATRON)
    gemm = sum(k.flops for k in work.forward.kernels if k.kind == "gemm")
    up = cq * n * (nope + rope) + c * n * (nope + v) + n * v * h + 3 * h * f
    assert gemm == pytest.approx(2 * tokens * up / tp + 2 * local * h * (cq + c + rope))
    attn = [k for k in work.forward.kernels if k.kind == "attn"]
    assert len(attn) == 1 and attn[0].flops == pytest.approx(2 * mbs * seq * (seq / 2) * n / tp * (nope + rope + v))
    collectives = [(c_.op, c_.bytes / 2) for c_ in work.forward.collectives]
    if sp:
        assert collectives == [("all_gather", tokens * cq), ("all_gather", tokens * (c + rope)),
                               ("reduce_scatter", tokens * h), ("all_gather", tokens * h),
                               ("reduce_scatter", tokens * h)]
    else:
        assert collectives == []
    backward = sorted((c_.op, c_.bytes / 2) for c_ in work.backward.collectives)
    if sp:    # conjugates, and Megatron's re-gathers of the sharded q latent and fc1 input for dW
        assert backward == sorted([("reduce_scatter", tokens * cq), ("reduce_scatter", tokens * (c + rope)),
                                   ("all_gather", tokens * h), ("reduce_scatter", tokens * h),
                                   ("all_gather", tokens * h), ("all_gather", tokens * cq), ("all_gather", tokens * h)])
    else:
        assert backward == []


def test_without_sp_the_backward_reduces_the_latents_gradients():
    """tp 4, no SP: forward all-reduces after W^O and fc2 (h per token); backward all-reduces the gradients of
    the duplicated down projections' outputs (q latent, kv latent, rope key) and of fc1's input (h)."""
    m, mbs, seq, tp = _mla_tiny(), 1, 512, 4
    work = block_work(m, mbs, seq, tp, False, "none", Dtypes.of("bf16"), MEGATRON)
    tokens = mbs * seq
    assert [(c.op, c.bytes / 2) for c in work.forward.collectives] == [("all_reduce", tokens * 256)] * 2
    assert sorted(c.bytes / 2 for c in work.backward.collectives if c.op == "all_reduce") == sorted(
        [tokens * (96 + 64 + 16), tokens * 256])
    assert len(work.backward.collectives) == 2


@pytest.mark.parametrize("tp,sp,saves", [(1, False, "sharded"), (4, True, "sharded"), (4, True, "gathered")])
def test_activation_bytes_against_a_hand_count(tp, sp, saves):
    """bf16, flash, no dropout, no recompute, per micro-batch: two norms' inputs (2h bytes) and 1/rms (4 B) per
    token of the shard; the down projections' input (the norm output); each latent norm's input and 1/rms; the
    up projections' inputs (the q latent kept sharded or gathered as the engine keeps SP inputs, the kv latent
    gathered by hand); q and k at n (d_h + d_h^R), v and the output at n d_v; the fp32 log-sum-exp per head and
    row; fc1's input; SwiGLU's gate, up and product."""
    from dataclasses import replace
    m, mbs, seq = _mla_tiny(), 2, 512
    tokens, h, n, c, cq, qk, v, f = mbs * seq, 256, 8, 64, 96, 48, 24, 512
    local = tokens / tp if sp else tokens
    kept_q = tokens if (sp and saves == "gathered") else local
    heads = n / tp
    expected = (2 * local * (2 * h + 4) + 2 * local * h
                + local * (2 * cq + 4) + 2 * kept_q * cq
                + local * (2 * c + 4) + 2 * tokens * c
                + 2 * tokens * heads * (2 * qk + 2 * v) + 4 * mbs * seq * heads
                + 2 * kept_q * h + 2 * 3 * tokens * f / tp)
    opts = replace(MEGATRON, sp_saves=saves)
    assert block_activation_bytes(m, mbs, seq, tp, sp, "none", Dtypes.of("bf16"), opts) == pytest.approx(expected)


def test_no_q_latent_projects_queries_directly():
    """DeepSeek-V2-Lite: W^Q h -> n (d_h + d_h^R); no q latent norm."""
    cfg = json.loads((DATA / "deepseek_v2_lite_config.json").read_text())
    m = load_model(str(DATA / "deepseek_v2_lite_config.json"))
    assert m.mla.q_lora_rank is None and cfg["q_lora_rank"] is None
    weights, norms = _latent_attention_weights(cfg)
    assert norms == cfg["kv_lora_rank"]
    dense_layer = weights + norms + 3 * cfg["hidden_size"] * cfg["intermediate_size"] + 2 * cfg["hidden_size"]
    one_dense = m.model_copy(update={"moe": None, "num_layers": 1})
    assert total_params(one_dense) == dense_layer + 2 * cfg["vocab_size"] * cfg["hidden_size"] + cfg["hidden_size"]



@pytest.mark.parametrize("change,message", [
    ({"moe_layer_freq": 2}, "'moe_layer_freq': MoE layers other than every layer"),
    ({"scoring_func": "tanh"}, "'scoring_func': 'tanh' is not a router"),
    ({"num_key_value_heads": 16}, "'num_key_value_heads': latent attention has a key and value per head"),
    ({"attention_bias": True}, "'attention_bias': biases in DeepSeek's projections"),
    ({"quantization_config": {"quant_method": "fp8"}}, "'quantization_config': quantized weights"),
    ({"some_new_key": 1}, "'some_new_key': not a key meshplan knows for model_type 'deepseek_v3'"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim 63 must be even"),
])
def test_deepseek_keys_are_modelled_or_refused_in_one_line(tmp_path, change, message):
    cfg = {**json.loads((DATA / "deepseek_v3_config.json").read_text()), **change}
    with pytest.raises(InputError, match=message):
        load_config_dict(tmp_path, cfg)


def test_deepseek_moe_keys_map_to_the_moe_spec():
    m = load_model(str(DATA / "deepseek_v3_config.json"))
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_size, m.moe.shared_width, m.moe.first_dense_layers) \
        == (256, 8, 2048, 2048, 3)
    assert m.num_moe_layers == 58 and not m.tied_embeddings
    v2 = load_model(str(DATA / "deepseek_v2_config.json"))
    assert v2.moe.router == "softmax" and v2.moe.shared_width == 2 * 1536 and v2.num_moe_layers == 59


@pytest.mark.parametrize("update,message", [
    ({"num_kv_heads": 4}, "mla: num_kv_heads 4 is not modelled"),
    ({"head_dim": 64}, "mla: head_dim 64 is not modelled"),
    ({"position_embedding": "learned"}, "mla: position_embedding learned"),
    ({"qk_norm": "rmsnorm"}, "mla: qk_norm rmsnorm"),
])
def test_spec_refuses_what_latent_attention_does_not_combine_with(update, message):
    with pytest.raises(ValueError, match=message):
        _mla_tiny(**update)


def test_runtime_refuses_latent_attention_in_one_line():
    from runtime.checks import unsupported
    v2 = load_model(str(DATA / "deepseek_v2_config.json"))         # a softmax router: the MoE checks pass
    assert unsupported(v2) == "the runtime does not build models with mla yet (GPT-2 and Llama blocks only)"


@pytest.mark.parametrize("target,message", [
    ("deepspeed", "DeepSpeed's AutoTP shards Linear layers by name"),
    ("torchtitan", "torchtitan 0.3.0 ships no mixture-of-experts model shaped like mla-moe"),
])
def test_exports_without_latent_attention_refuse_it_in_one_line(target, message):
    from planner.export import export_plan
    from tests.export_helpers import make_test_plan
    plan = make_test_plan("mla_moe", engine="megatron")
    with pytest.raises(InputError, match=message):
        export_plan(plan, target)


def test_megatron_arguments_carry_the_latent_attention():
    """The widths as Megatron-Core's MLA flags (its --qk-head-dim is the nope width, --qk-layernorm the latent
    norms); tests/test_export_engines.py runs Megatron's own parser on them."""
    from planner.export import export_plan
    from tests.export_helpers import make_test_plan
    args = export_plan(make_test_plan("mla_moe", engine="megatron"), "megatron").files["args.txt"]
    assert ("--multi-latent-attention --kv-lora-rank 128 --qk-head-dim 64 --qk-pos-emb-head-dim 32 --v-head-dim 64 "
            "--qk-layernorm --q-lora-rank 384") in args
    assert "--group-query-attention" not in args and "--kv-channels" not in args


def test_eager_attention_scores_over_nope_plus_rope_and_values_at_v():
    """Materialised softmax(Q K^T) V per head: Q K^T over d_h + d_h^R channels and P V at d_v, over the full s x s
    matrix (an eager kernel computes the masked half too); selective recomputation replays that core."""
    m, mbs, seq, tp = _mla_tiny(attention_kernel="eager"), 1, 256, 2
    work = block_work(m, mbs, seq, tp, True, "selective", Dtypes.of("bf16"), MEGATRON)
    core = [(k.shape, k.flops) for k in work.recompute.kernels if k.kind == "gemm"]     # the replayed core
    heads = 8 / tp
    assert core == [((seq, seq, 48), 2 * mbs * heads * seq * seq * 48),
                    ((seq, 24, seq), 2 * mbs * heads * seq * seq * 24)]
    assert all(k in work.forward.kernels for k in work.recompute.kernels)

def test_estimate_plans_the_imported_deepseek_v3(capsys):
    from tests.cli_helpers import run_cli
    r = run_cli(capsys, "estimate", "-m", str(DATA / "deepseek_v3_config.json"), "-c", "dgx-h100", "--nodes", "256",
                "-b", "2048", "--seq", "4096", "--tp", "2", "--sp", "--pp", "16", "--dp", "64", "--ep", "8",
                "--recompute", "full", "--zero", "1", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert (d["model"]["params"], d["model"]["active_params"]) == (671_026_404_352, 37_552_282_624)
