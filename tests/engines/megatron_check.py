"""Run Megatron-LM's own argument code on meshplan exports; print what it read back, as JSON.

Usage (in the engine venv): python megatron_check.py JOBS.json, JOBS a list of {"dir", "world_size"}.
For each export directory: the environment its launch.sh exports, then parse_args, validate_args and
core_transformer_config_from_args (megatron-core 0.19.2), the vocabulary padding of build_tokenizer and
initialize_model_parallel on PyTorch's fake process-group backend. CPU-only shims (../shared/engine-validation.md):
typing.override for Python 3.11, Hopper as the device architecture, rope fusion off (Transformer Engine is absent).
"""

import contextlib
import io
import json
import logging
import os
import re
import sys
import typing

import typing_extensions

typing.override = typing_extensions.override   # megatron.training uses Python 3.12's typing.override


def check(directory: str, world_size: int) -> dict:
    import megatron.training.arguments as margs
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    import torch
    margs.get_device_arch_version = lambda: 9         # no GPU to ask: Hopper
    torch.cuda.get_device_capability = lambda *a: (9, 0)   # --moe-grouped-gemm asks for compute capability >= 8
    with open(os.path.join(directory, "launch.sh")) as f:
        env = dict(re.findall(r"^export (\w+)=(\S+)$", f.read(), re.MULTILINE))
    os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    os.environ.update(env, WORLD_SIZE=str(world_size), RANK="0")
    with open(os.path.join(directory, "args.json")) as f:
        sys.argv = ["pretrain_gpt.py", *json.load(f)]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            args = margs.parse_args()
            margs.validate_args(args)
            args.apply_rope_fusion = False               # needs Transformer Engine
            cfg = margs.core_transformer_config_from_args(args)
    except (SystemExit, AssertionError, ValueError) as exc:
        lines = [x for x in log.getvalue().splitlines() if "error" in x.lower()]
        return {"error": f"{type(exc).__name__}: {exc} {lines[-1:] if lines else ''}"}
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1
    layout = cfg.pipeline_model_parallel_layout
    chunks = []
    for j in range(pp * vpp):
        p, v = j % pp, j // pp
        if layout is not None:
            chunks.append(layout.layout[p][v].count(LayerType.decoder))
        else:
            chunks.append(get_num_layers_to_build(cfg, vp_stage=v if vpp > 1 else None, pp_rank=p))
    padded = vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(
            args.tensor_model_parallel_size, pp, args.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            order="tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp",
            create_gloo_process_groups=False)
        groups = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                  "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                  "dp": parallel_state.get_data_parallel_world_size()}
        if cfg.num_moe_experts is not None:
            groups.update(ep=parallel_state.get_expert_model_parallel_world_size(),
                          etp=parallel_state.get_expert_tensor_parallel_world_size(),
                          edp=parallel_state.get_expert_data_parallel_world_size(),
                          ep_ranks=dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return {
        "tp": args.tensor_model_parallel_size, "pp": pp, "dp": args.data_parallel_size, "vpp": vpp,
        "groups": groups, "layers_per_chunk": chunks,
        "mbs": args.micro_batch_size, "global_batch": args.global_batch_size,
        "sp": cfg.sequence_parallel, "recompute_granularity": cfg.recompute_granularity,
        "recompute_method": cfg.recompute_method, "recompute_num_layers": cfg.recompute_num_layers,
        "distributed_optimizer": args.use_distributed_optimizer, "megatron_fsdp": args.use_megatron_fsdp,
        "sharding": args.data_parallel_sharding_strategy if args.use_megatron_fsdp else None,
        "overlap_grad_reduce": args.overlap_grad_reduce, "bf16": cfg.bf16, "fp16": cfg.fp16,
        "tp_pp_dp_mapping": args.use_tp_pp_dp_mapping, "optimizer": args.optimizer, "weight_decay": args.weight_decay,
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups, "ffn_hidden_size": cfg.ffn_hidden_size,
        "gated_linear_unit": cfg.gated_linear_unit, "normalization": cfg.normalization,
        "add_bias_linear": cfg.add_bias_linear, "add_qkv_bias": cfg.add_qkv_bias,
        "position_embedding_type": args.position_embedding_type, "rotary_base": args.rotary_base,
        "untie_embeddings": args.untie_embeddings_and_output_weights, "seq_length": args.seq_length,
        "max_position_embeddings": args.max_position_embeddings, "padded_vocab_size": padded,
        "hidden_dropout": cfg.hidden_dropout, "attention_dropout": cfg.attention_dropout,
        "attention_backend": cfg.attention_backend.name, "layernorm_epsilon": cfg.layernorm_epsilon,
        "kv_channels": cfg.kv_channels, "qk_layernorm": cfg.qk_layernorm, "qk_l2_norm": cfg.qk_l2_norm,
        **(moe_fields(cfg) if cfg.num_moe_experts is not None else {"num_moe_experts": None}),
        **(mla_fields(cfg) if getattr(cfg, "multi_latent_attention", False) else {"multi_latent_attention": False}),
    }


def mla_fields(cfg) -> dict:
    """The latent attention's widths as MLATransformerConfig holds them, and the modules Megatron's GPT spec
    builds for its attention: MLASelfAttention, with norms on the latents (not identity)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    attention = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False)[0].submodules.self_attention
    sub = attention.submodules
    return {"multi_latent_attention": True, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_head_dim": cfg.qk_head_dim, "qk_pos_emb_head_dim": cfg.qk_pos_emb_head_dim,
            "v_head_dim": cfg.v_head_dim, "mla_module": _builds(attention, MLASelfAttention),
            "latent_norms": not (_builds(sub.q_layernorm, IdentityOp) or _builds(sub.kv_layernorm, IdentityOp))}


def _builds(spec, cls) -> bool:
    """Whether a layer spec (a ModuleSpec or a functools.partial of one's class) builds `cls`."""
    target = getattr(spec, "module", None) or getattr(spec, "func", None)
    return isinstance(target, type) and issubclass(target, cls)


def moe_fields(cfg) -> dict:
    """The MoE settings as TransformerConfig holds them, and which layers Megatron's GPT spec builds as MoE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer
    specs = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False)
    return {"num_moe_experts": cfg.num_moe_experts, "moe_router_topk": cfg.moe_router_topk,
            "expert_model_parallel_size": cfg.expert_model_parallel_size,
            "expert_tensor_parallel_size": cfg.expert_tensor_parallel_size,
            "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
            "moe_layers": "".join("1" if _builds(s.submodules.mlp, MoELayer) else "0" for s in specs),
            "moe_router_score_function": cfg.moe_router_score_function,
            "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
            "moe_shared_expert_gate": cfg.moe_shared_expert_gate,
            "moe_expert_capacity_factor": cfg.moe_expert_capacity_factor,
            "moe_token_dispatcher_type": cfg.moe_token_dispatcher_type, "moe_grouped_gemm": cfg.moe_grouped_gemm,
            "moe_aux_loss_coeff": cfg.moe_aux_loss_coeff}


def main() -> None:
    logging.disable(logging.WARNING)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = [check(job["dir"], job["world_size"]) for job in jobs]
    print("\n" + json.dumps(results))      # the last line of stdout


if __name__ == "__main__":
    main()
