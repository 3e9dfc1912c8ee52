"""Each engine's own code reads meshplan's exports: Megatron-LM's parse_args, validate_args and
core_transformer_config_from_args (megatron-core 0.19.2), DeepSpeed 0.19.8's DeepSpeedConfig, torchtitan 0.3.0's
ConfigManager.parse_args and ParallelDims. The engines live in their own venv (`make engines`, which `make test`
builds); each runs once, in a subprocess, on all its exports (tests/engines/*_check.py print JSON).
The expected values are the plan's configuration (or the nearest one the export reports), not the exporter's."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from planner.export import export_plan
from planner.export.torchtitan import FLAVOURS, default_split
from tests.conftest import ROOT
from tests.export_helpers import make_test_plan, write_export

ENGINE_PYTHON = ROOT / ".engines" / "venv" / "bin" / "python"
DRIVERS = ROOT / "tests" / "engines"
EXPORTS = {"megatron": ["gpt_dense", "llama_gqa", "interleaved_uneven", "gpt_fp16_pp", "gpt_zero2_tp",
                        "gpt_pipe_zero1", "mixtral_ep_tp", "qwen3_moe_ep", "qwen3_moe_fsdp", "moe_variants",
                        "mixtral_fsdp_interleaved", "mla_moe"],
           "deepspeed": ["gpt_pipe_zero1", "gpt_zero2_tp", "llama_gqa", "mixtral_ep_zero3", "qwen3_moe_fsdp"],
           "torchtitan": ["llama_gqa", "interleaved_uneven_amp", "llama_zero2_pp", "qwen3_moe_fsdp", "qwen3_moe_pp"]}

if not ENGINE_PYTHON.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{ENGINE_PYTHON} is missing: `make test` builds it with `make engines`")
    pytest.skip("the engine venv is not built (make engines)", allow_module_level=True)


def run_driver(name: str, jobs, tmp_path) -> list:
    jobs_file = tmp_path / f"{name}_jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([str(ENGINE_PYTHON), str(DRIVERS / f"{name}_check.py"), str(jobs_file)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def overlaps(plan, training) -> bool:
    """Whether the written job reduces gradients under the backward: the training's override, else the plan's
    engine's."""
    if training.overlap_grad_reduce is not None:
        return training.overlap_grad_reduce
    return plan.engine.overlap.grad_reduce == "during_backward"


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """({target: [(plan name, plan, export, what the engine read), ...]}, {target: its verdict on a broken job,
    "flavours": torchtitan's llama3 model shapes, "splits": its default layer splits})."""
    root = tmp_path_factory.mktemp("exports")
    out, broken = {}, {}
    for target, names in EXPORTS.items():
        exports, jobs = [], []
        for name in names:
            plan = make_test_plan(name, engine=target)
            result = export_plan(plan, target)
            directory = root / target / name
            write_export(result, directory)
            cfg = result.adjusted.config
            size = cfg.dp if target == "deepspeed" else cfg.tp * cfg.pp * cfg.dp
            exports.append((name, plan, result))
            jobs.append({"dir": str(directory), ("dp" if target == "deepspeed" else "world_size"): size,
                         **({"world_size": cfg.tp * cfg.pp * cfg.dp} if target == "deepspeed" else {})})
        jobs.append({**jobs[0]})               # the first export again, on a world it does not fit
        key = "dp" if target == "deepspeed" else "world_size"
        jobs[-1][key] = jobs[0][key] + 1 if target != "deepspeed" else jobs[0][key] * 2
        results = run_driver(target, jobs, root)
        if target == "torchtitan":
            broken["splits"] = results.pop()
            broken["moe_flavours"] = results.pop()
            broken["flavours"] = results.pop()
        out[target] = [(n, p, r, got) for (n, p, r), got in zip(exports, results)]
        broken[target] = results[-1]
    return out, broken


def _no_errors(rows):
    for name, _, _, got in rows:
        assert "error" not in got, f"{name}: {got['error']}"


def test_megatron_accepts_the_exports_and_reads_back_the_plan(checked):
    rows = checked[0]["megatron"]
    _no_errors(rows)
    for name, plan, result, got in rows:
        cfg, t, m = result.adjusted.config, result.adjusted.training, plan.model
        assert (got["tp"], got["pp"], got["dp"], got["vpp"]) == (cfg.tp, cfg.pp, cfg.dp, cfg.vpp), name
        assert {k: got["groups"][k] for k in ("tp", "pp", "dp")} == {"tp": cfg.tp, "pp": cfg.pp, "dp": cfg.dp}, name
        assert got["layers_per_chunk"] == list(cfg.layers_per_stage), name
        assert (got["mbs"], got["global_batch"]) == (cfg.mbs, t.global_batch), name
        assert got["sp"] == cfg.sp, name
        assert (got["recompute_granularity"], got["recompute_method"], got["recompute_num_layers"]) == {
            "none": (None, None, None), "selective": ("selective", None, None),
            "full": ("full", "uniform", 1)}[cfg.recompute], name
        assert got["distributed_optimizer"] == (cfg.zero >= 1), name
        assert got["sharding"] == {2: "optim_grads", 3: "optim_grads_params"}.get(cfg.zero), name
        assert got["overlap_grad_reduce"] == overlaps(plan, t), name
        assert (got["bf16"], got["fp16"]) == (t.precision == "bf16", t.precision == "fp16"), name
        assert got["tp_pp_dp_mapping"] == (result.adjusted.order == ("tp", "pp", "dp")), name
        assert got["optimizer"] == "adam" and got["weight_decay"] > 0, name     # Megatron's adam is AdamW
        assert (got["num_layers"], got["hidden_size"], got["num_heads"], got["num_query_groups"],
                got["ffn_hidden_size"]) == (m.num_layers, m.hidden_size, m.num_heads, m.kv_heads, m.ffn_size), name
        assert got["padded_vocab_size"] == m.vocab_size, name          # Megatron pads nothing the plan did not cost
        assert got["gated_linear_unit"] == (m.mlp == "swiglu"), name
        assert got["normalization"] == {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[m.norm], name
        assert (got["add_bias_linear"], got["add_qkv_bias"]) == (m.bias, m.has_qkv_bias), name
        assert got["position_embedding_type"] == {"learned": "learned_absolute", "rope": "rope"}[
            m.position_embedding], name
        if m.position_embedding == "rope":
            assert got["rotary_base"] == m.rope_theta, name
        assert got["untie_embeddings"] == (not m.tied_embeddings), name
        assert (got["seq_length"], got["max_position_embeddings"]) == (t.seq_len, m.max_position_embeddings), name
        assert got["hidden_dropout"] == got["attention_dropout"] == m.dropout, name
        assert got["attention_backend"] == "flash" and got["layernorm_epsilon"] == m.norm_eps, name
        assert got["kv_channels"] == m.dim_per_head, name
        assert got["qk_layernorm"] == (m.qk_norm == "rmsnorm" or m.mla is not None), name   # MLA: latent norms
        assert got["multi_latent_attention"] == (m.mla is not None), name
        if m.mla is not None:
            a = m.mla
            assert (got["q_lora_rank"], got["kv_lora_rank"], got["qk_head_dim"], got["qk_pos_emb_head_dim"],
                    got["v_head_dim"]) == (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
                                           a.v_head_dim), name
            assert got["mla_module"] and got["latent_norms"], name
        assert got["num_moe_experts"] == (m.moe.num_experts if m.moe else None), name
        if m.moe is not None:
            _megatron_moe(name, m, cfg, got)
    assert "world size" in checked[1]["megatron"]["error"]


def _megatron_moe(name, m, cfg, got):
    """Megatron's TransformerConfig and process groups against the plan's experts and ep; which layers its GPT
    layer specs build as MoE against the spec's rule (the first k dense, then every n-th)."""
    moe = m.moe
    assert (got["moe_router_topk"], got["moe_ffn_hidden_size"]) == (moe.top_k, moe.expert_ffn_size), name
    assert got["expert_model_parallel_size"] == cfg.ep and got["expert_tensor_parallel_size"] == cfg.tp, name
    want_layers = "".join("1" if i >= moe.first_dense_layers and (i + 1) % moe.every == 0 else "0"
                          for i in range(m.num_layers))
    assert got["moe_layers"] == want_layers, name
    assert got["moe_router_score_function"] == moe.router, name
    shared = moe.shared_experts * (moe.shared_ffn_size or moe.expert_ffn_size)
    assert got["moe_shared_expert_intermediate_size"] == (shared or None), name
    assert got["moe_shared_expert_gate"] == moe.shared_expert_gate, name
    assert got["moe_expert_capacity_factor"] == moe.capacity_factor, name
    assert got["moe_token_dispatcher_type"] == "alltoall" and got["moe_grouped_gemm"] is True, name
    g = got["groups"]
    # experts over ep consecutive data-parallel ranks (global ranks tp apart), each expert over the TP group
    assert (g["ep"], g["etp"], g["edp"]) == (cfg.ep, cfg.tp, cfg.dp // cfg.ep), name
    assert g["ep_ranks"] == [d * cfg.tp for d in range(cfg.ep)], name


def test_deepspeed_accepts_the_exports_and_reads_back_the_plan(checked):
    rows = checked[0]["deepspeed"]
    _no_errors(rows)
    for name, plan, result, got in rows:
        cfg, t = result.adjusted.config, result.adjusted.training
        assert got["world_size"] == cfg.dp, name
        assert (got["train_batch_size"], got["micro_batch"]) == (t.global_batch, cfg.mbs), name
        assert got["gradient_accumulation"] * cfg.mbs * cfg.dp == t.global_batch, name
        assert got["zero_stage"] == cfg.zero, name
        assert got["overlap_comm"] == (overlaps(plan, t) and cfg.zero >= 1), name
        assert (got["bf16"], got["fp16"], got["torch_autocast"]) == (
            t.precision == "bf16", t.precision == "fp16", t.precision == "amp-bf16"), name
        assert got["dynamic_loss_scale"] == (t.precision == "fp16"), name
        assert got["optimizer"] == {"adamw": "adamw", "adam": "adam", "sgd": "sgd"}[t.optimizer], name
        assert got["autotp_size"] == (cfg.tp if cfg.tp > 1 else 0), name
        assert got["activation_checkpointing"] == (cfg.recompute == "full"), name
        if cfg.pp > 1:
            assert got["pipeline"]["stages"] == cfg.pp, name
            assert got["pipeline"]["activation_checkpoint_interval"] == (1 if cfg.recompute == "full" else 0), name
        moe = plan.model.moe
        if moe is None or cfg.ep == 1:
            assert got["expert_parallel"] == {}, name
        else:       # AutoEP: experts over ep consecutive ranks, their replicas ep apart
            e = got["expert_parallel"]
            assert (e["ep"], e["etp"], e["top_k"], e["score_func"]) == (cfg.ep, 1, moe.top_k, moe.router), name
            assert e["ep_ranks"] == list(range(cfg.ep)), name
            assert e["edp_ranks"] == list(range(0, cfg.dp, cfg.ep)), name
    assert "train_batch_size is not equal" in checked[1]["deepspeed"]["error"]


def test_torchtitan_accepts_the_exports_and_reads_back_the_plan(checked):
    rows = checked[0]["torchtitan"]
    _no_errors(rows)
    for name, plan, result, got in rows:
        cfg, t = result.adjusted.config, result.adjusted.training
        shard = cfg.dp if cfg.zero >= 2 else 1
        assert (got["dp_replicate"], got["dp_shard"], got["tp"], got["pp"], got["cp"]) == (
            cfg.dp // shard, shard, cfg.tp, cfg.pp, 1), name
        assert got["world_size"] == cfg.tp * cfg.pp * cfg.dp, name
        assert got["sp"] == cfg.sp, name
        if cfg.zero >= 2:
            assert got["reshard"] == {2: "never", 3: "always"}[cfg.zero], name
        if cfg.pp > 1:
            assert got["schedule"] == {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe",
                                       "interleaved": "ScheduleInterleaved1F1B"}[cfg.schedule], name
            assert got["layers_per_chunk"] == list(cfg.layers_per_stage), name
            assert got["first_chunk"] == "tok_embeddings" and got["last_chunk"] == ["norm", "lm_head"], name
            assert got["microbatch"] == cfg.mbs, name
            assert got["local_batch"] // got["microbatch"] == cfg.microbatches(t.global_batch), name   # per DP rank
        else:
            assert got["local_batch"] == cfg.mbs, name
        assert (got["global_batch"], got["seq_len"]) == (t.global_batch, t.seq_len), name
        assert got["param_dtype"] == ("float32" if t.precision == "fp32" else "bfloat16"), name
        assert got["reduce_dtype"] == "float32", name
        assert got["activation_checkpoint"] == {"none": "NoneType", "selective": "SelectiveAC",
                                                "full": "FullAC"}[cfg.recompute], name
        assert got["compile"] is False and (got["num_layers"], got["dim"]) == (
            plan.model.num_layers, plan.model.hidden_size), name
        assert (got["ep"], got["ep_enabled"]) == (cfg.ep, cfg.ep > 1), name
        assert got["module"] == ("qwen3" if plan.model.moe else "llama3"), name
    assert "error" in checked[1]["torchtitan"]


def test_torchtitan_moe_flavour_is_what_its_registry_builds(checked):
    """The qwen3_30b_a3b config torchtitan ships against meshplan's flavour and the qwen3-30b-a3b preset
    (Qwen's published config.json)."""
    from planner.presets import PRESETS
    spec, preset = FLAVOURS["qwen3_30b_a3b"], PRESETS["qwen3-30b-a3b"]
    s = checked[1]["moe_flavours"]["qwen3_30b_a3b"]
    for m in (spec, preset):
        assert (s["num_layers"], s["hidden_size"], s["num_heads"], s["num_kv_heads"], s["head_dim"],
                s["vocab_size"], s["tied"], s["rope_theta"], s["max_seq_len"], s["norm_eps"]) == (
            m.num_layers, m.hidden_size, m.num_heads, m.kv_heads, m.dim_per_head, m.vocab_size, m.tied_embeddings,
            m.rope_theta, m.max_position_embeddings, m.norm_eps)
        assert s["qk_norm"] == (m.qk_norm == "rmsnorm") and s["every_layer_moe"] == (m.num_moe_layers == m.num_layers)
        assert (s["num_experts"], s["top_k"], s["expert_ffn"], s["score_func"]) == (
            m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_size, m.moe.router)
        assert s["capacity_factor"] == m.moe.capacity_factor and s["shared_experts"] == (m.moe.shared_experts > 0)


def test_torchtitan_flavours_are_those_its_registry_ships(checked):
    shipped = checked[1]["flavours"]
    dense = {n: s for n, s in FLAVOURS.items() if s.moe is None}
    assert set(shipped) == set(dense)
    for name, spec in dense.items():
        s = shipped[name]
        assert (s["num_layers"], s["hidden_size"], s["num_heads"], s["num_kv_heads"], s["ffn_hidden_size"],
                s["vocab_size"], s["tied"], s["bias"], s["rope_theta"], s["norm_eps"]) == (
            spec.num_layers, spec.hidden_size, spec.num_heads, spec.kv_heads, spec.ffn_size, spec.vocab_size,
            spec.tied_embeddings, spec.bias, spec.rope_theta, spec.norm_eps), name


def test_the_torchtitan_reader_splits_layers_as_torchtitan_does(checked):
    """Without a module list, torchtitan splits the layers itself: the reader's rule against its code."""
    cases = [(4, 32, 1, 1), (2, 6, 1, 1), (8, 32, 1, 1), (6, 80, 2, 3)]     # tests/engines/torchtitan_check.py
    assert [default_split(*case) for case in cases] == checked[1]["splits"]
