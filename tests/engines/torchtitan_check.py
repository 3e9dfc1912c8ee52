"""Run torchtitan's own configuration code on meshplan exports; print what it read back, as JSON.

Usage (in the engine venv): python torchtitan_check.py JOBS.json, JOBS a list of {"dir", "world_size"}; the
last job's result is followed by the model shapes of the llama3 config registry and torchtitan's default
layer split for a few pipelines.
torchtitan 0.3.0: ConfigManager.parse_args on the export's args.json, ParallelDims.from_config for the degrees,
get_schedule_class for the schedule, and the module list of each pipeline chunk.
"""

import contextlib
import io
import json
import logging
import os
import re
import sys


def check(directory: str, world_size: int) -> dict:
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    with open(os.path.join(directory, "args.json")) as f:
        args = json.load(f)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            cfg = ConfigManager().parse_args(args)
            dims = ParallelDims.from_config(cfg.parallelism, world_size)
    except (SystemExit, ValueError, AssertionError) as exc:
        lines = [x.strip("│ ") for x in log.getvalue().splitlines() if x.strip("│ ─╭╮╰╯")]
        return {"error": f"{type(exc).__name__}: {exc} {' '.join(lines[-4:])}"}
    p, t = cfg.parallelism, cfg.training
    schedule = None
    if dims.pp > 1:
        from torch.distributed.pipelining.schedules import get_schedule_class
        schedule = get_schedule_class(p.pipeline_parallel_schedule).__name__
    parts = p.module_fqns_per_model_part
    chunks = None if parts is None else [sum(1 for n in part if re.fullmatch(r"layers\.\d+", n)) for part in parts]
    m = cfg.model_spec.model
    return {
        "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "pp": dims.pp, "cp": dims.cp,
        "world_size": dims.world_size, "sp": p.enable_sequence_parallel, "reshard": p.fsdp_reshard_after_forward,
        "schedule": schedule, "microbatch": p.pipeline_parallel_microbatch_size, "layers_per_chunk": chunks,
        "first_chunk": parts[0][0] if parts else None, "last_chunk": parts[-1][-2:] if parts else None,
        "local_batch": t.local_batch_size, "global_batch": t.global_batch_size, "seq_len": t.seq_len,
        "param_dtype": t.mixed_precision_param, "reduce_dtype": t.mixed_precision_reduce,
        "activation_checkpoint": type(cfg.activation_checkpoint).__qualname__.split(".")[0],
        "compile": cfg.compile.enable, "num_layers": len(m.layers), "dim": m.dim, "ep": dims.ep,
        "ep_enabled": dims.ep_enabled, "module": cfg.model_spec.name, "flavor": cfg.model_spec.flavor,
    }


def flavours() -> dict:
    """The llama3 config functions and their model shapes (a float8 flavour needing torchao: its model)."""
    import torchtitan.models.llama3.config_registry as registry
    out = {}
    for name in dir(registry):
        if not re.fullmatch(r"llama3_(debugmodel|\d+b)", name):
            continue
        try:
            model = getattr(registry, name)().model_spec.model
        except ImportError:        # llama3_405b converts to float8 through torchao
            model = registry.model_registry(name.split("_")[1].upper()).model
        layer = model.layers[0]
        out[name] = {"num_layers": len(model.layers), "hidden_size": model.dim,
                     "num_heads": layer.attention.n_heads,
                     "num_kv_heads": layer.attention.n_kv_heads or layer.attention.n_heads,
                     "ffn_hidden_size": layer.feed_forward.w1.out_features, "vocab_size": model.vocab_size,
                     "tied": bool(getattr(model, "enable_weight_tying", False)),
                     "bias": bool(layer.feed_forward.w1.bias), "rope_theta": layer.attention.rope.theta,
                     "norm_eps": layer.attention_norm.eps}
    return out


def moe_flavours() -> dict:
    """The qwen3 MoE configs meshplan exports, as torchtitan's registry builds them (config objects only)."""
    import torchtitan.models.qwen3.config_registry as registry
    out = {}
    for name in ("qwen3_30b_a3b",):
        model = getattr(registry, name)().model_spec.model
        layer = model.layers[0]
        moe, attention = layer.moe, layer.attention
        out[name] = {"num_layers": len(model.layers), "hidden_size": model.dim, "num_heads": attention.n_heads,
                     "num_kv_heads": attention.n_kv_heads, "head_dim": attention.head_dim,
                     "qk_norm": attention.qk_norm is not None, "vocab_size": model.vocab_size,
                     "tied": bool(getattr(model, "enable_weight_tying", False)),
                     "rope_theta": attention.rope.theta, "max_seq_len": attention.rope.max_seq_len,
                     "norm_eps": layer.attention_norm.eps,
                     "every_layer_moe": all(block.moe is not None for block in model.layers),
                     "num_experts": moe.num_experts, "top_k": moe.router.top_k,
                     "score_func": moe.router.score_func, "route_norm": moe.router.route_norm,
                     "expert_ffn": moe.routed_experts.inner_experts.hidden_dim,
                     "capacity_factor": getattr(moe.routed_experts.token_dispatcher, "non_blocking_capacity_factor",
                                                None),
                     "shared_experts": getattr(moe, "shared_experts", None) is not None}
    return out


SPLITS = [(4, 32, 1, 1), (2, 6, 1, 1), (8, 32, 1, 1), (6, 80, 2, 3)]   # (stages, layers, first less, last less)


def default_splits() -> list:
    """Blocks per chunk of torchtitan's own split when no module list is given, for each of SPLITS."""
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part
    return [[sum(1 for n in part if n.startswith("layers.")) for part in
             _generate_llm_fqn_per_model_part(*case)] for case in SPLITS]


def main() -> None:
    logging.disable(logging.WARNING)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    result = [check(job["dir"], job["world_size"]) for job in jobs] + [flavours(), moe_flavours(), default_splits()]
    print("\n" + json.dumps(result))      # the last line of stdout


if __name__ == "__main__":
    main()
