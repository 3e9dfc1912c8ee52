"""torchtitan: a plan as `--module llama3 --config FLAVOUR` plus command-line overrides (args.json), and such
an argument list read back.

Keys are those of torchtitan 0.3.0 (`torchtitan/config/configs.py`, parsed by tyro); the flavours are the
model shapes its `llama3` config registry ships (`torchtitan/models/llama3/__init__.py`) and its `qwen3` module's
mixture-of-experts `qwen3_30b_a3b`, checked against the installed package by tests/engines/torchtitan_check.py.
"""

from __future__ import annotations

import json
import re

from planner.errors import InputError
from planner.export.common import (Adjusted, Launch, change_config, launch_script, overlaps_grad_reduce,
                                   parse_arg_list, resolved_config, slurm_script, take_int, take_str)
from planner.layout import DEFAULT_ORDER
from planner.specs import ModelSpec, MoESpec, ParallelConfig

TARGET = "torchtitan"
TITLE = "torchtitan (python -m torchtitan.train)"
_LLAMA3 = dict(tied_embeddings=False, norm="rmsnorm", mlp="swiglu", bias=False, position_embedding="rope",
               rope_theta=500000.0, norm_eps=1e-5, max_position_embeddings=131072, dropout=0.0,
               attention_kernel="flash")
# --config function of the llama3 module -> (layers, dim, heads, kv heads, FFN width, vocabulary)
FLAVOURS: dict[str, ModelSpec] = {
    name: ModelSpec(name=name, num_layers=shape[0], hidden_size=shape[1], num_heads=shape[2], num_kv_heads=shape[3],
                    ffn_hidden_size=shape[4], vocab_size=shape[5], **_LLAMA3)
    for name, shape in {"llama3_debugmodel": (6, 256, 16, 16, 768, 2048),
                        "llama3_8b": (32, 4096, 32, 8, 14336, 128256),
                        "llama3_70b": (80, 8192, 64, 8, 28672, 128256),
                        "llama3_405b": (126, 16384, 128, 8, 53248, 128256)}.items()}
# the qwen3 module's mixture-of-experts config (torchtitan/models/qwen3/__init__.py, _30b_a3b: every layer routes
# with a softmax router, dropless; flex attention, which keeps no score matrix: meshplan's flash)
FLAVOURS["qwen3_30b_a3b"] = ModelSpec(
    name="qwen3_30b_a3b", num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
    ffn_hidden_size=6144, vocab_size=151936, max_position_embeddings=40960, tied_embeddings=False, norm="rmsnorm",
    mlp="swiglu", bias=False, qk_norm="rmsnorm", position_embedding="rope", rope_theta=1e6, norm_eps=1e-6,
    dropout=0.0, attention_kernel="flash", moe=MoESpec(num_experts=128, top_k=8, expert_ffn_size=768))
MODULES = {name: name.split("_")[0] for name in FLAVOURS}        # --module of each --config
# the MoE models torchtitan 0.3.0 ships (its models/ folder) that meshplan does not model, for the refusal
OTHER_MOE = ("deepseek_v3 and kimi_k2_7 (multi-latent attention)", "gpt_oss (attention sinks, sliding window)")
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}
RESHARD = {2: "never", 3: "always"}      # FSDP2 reshard_after_forward: ZeRO-2 keeps gathered params, ZeRO-3 not


def flavour_of(model: ModelSpec) -> str:
    """The --config whose shape is the model's; InputError naming the shipped flavours when none is."""
    from planner.export.common import shape_difference
    for name, spec in FLAVOURS.items():
        if shape_difference(spec, model) is None:
            return name
    if model.moe is not None:
        raise InputError(f"torchtitan 0.3.0 ships no mixture-of-experts model shaped like {model.name}; meshplan "
                         f"exports its qwen3 module's qwen3_30b_a3b (48 layers, h 2048, 128 experts, top-8); it "
                         f"also ships {', '.join(OTHER_MOE)}", field="--to torchtitan")
    shipped = ", ".join(f"{n} ({s.num_layers} layers, h {s.hidden_size})" for n, s in FLAVOURS.items()
                        if s.moe is None)
    raise InputError(f"torchtitan 0.3.0 ships no model shaped like {model.name}; its llama3 module has {shipped}",
                     field="--to torchtitan")


# ---------------------------------------------------------------------------------------------- export
def nearest(plan) -> Adjusted:
    flavour_of(plan.model)
    cfg, training, changes = resolved_config(plan), plan.training, []
    if plan.model.moe is not None and cfg.tp > 1:
        raise InputError(f"torchtitan 0.3.0 has no expert tensor parallelism (its expert parallelism borrows the "
                         f"TP ranks: efsdp = dp_shard * tp / ep), which meshplan does not model: export a plan with "
                         f"tp 1 (this one has tp {cfg.tp})", field="--to torchtitan")
    if cfg.ep > 1 and cfg.zero == 0:
        cfg = change_config(cfg, zero=2)
        changes.append(f"ZeRO 0 -> 2: torchtitan's expert parallelism takes its ep {cfg.ep} ranks from FSDP's "
                       f"shard dimension (dp_shard), not from DDP's replicas")
    if cfg.dp > 1 and cfg.zero == 1:
        cfg = change_config(cfg, zero=2)
        changes.append("ZeRO 1 -> 2: torchtitan's FSDP2 shards gradients with the optimizer states")
    if training.precision in ("fp16", "amp-bf16"):
        # one bf16 setting: FSDP2's mixed precision when it shards, autocast under DDP (amp-bf16's recipe)
        if training.precision == "fp16" or (cfg.zero >= 1 and cfg.dp > 1):
            changes.append(f"precision {training.precision} -> bf16: torchtitan computes in bf16 with FSDP2's mixed "
                           f"precision (fp32 parameters sharded, bf16 gathered)")
        training = training.model_copy(update={"precision": "bf16"})
    if training.optimizer != "adamw":
        changes.append(f"optimizer {training.optimizer} -> adamw: torchtitan's llama3 configs use AdamW")
        training = training.model_copy(update={"optimizer": "adamw"})
    if cfg.dp > 1 and not overlaps_grad_reduce(plan):
        changes.append("gradient reduction overlapped with the backward: torchtitan's FSDP2 and DDP always overlap it")
        training = training.model_copy(update={"overlap_grad_reduce": True})
    order = tuple(plan.config.layout)
    if order != DEFAULT_ORDER:
        changes.append(f"rank order {','.join(order)} -> tp,dp,pp: torchtitan's device mesh is (pp, dp, tp) with "
                       f"tp fastest")
    if plan.config.placement is not None:
        changes.append("rank placement dropped: torchrun runs global rank r on GPU r of the node list")
    return Adjusted(cfg, training, DEFAULT_ORDER, tuple(changes))


def _chunk_modules(layers: list[int]) -> list[str]:
    """--parallelism.module_fqns_per_model_part values: one comma-separated module list per chunk."""
    out, first = [], 0
    for j, n in enumerate(layers):
        names = [f"layers.{i}" for i in range(first, first + n)]
        first += n
        if j == 0:
            names.insert(0, "tok_embeddings")
        if j == len(layers) - 1:
            names += ["norm", "lm_head"]
        out.append(",".join(names))
    return out


def arguments(plan, adj: Adjusted) -> list[str]:
    from planner.export.common import engine_compiles
    cfg, t = adj.config, adj.training
    dp_args = (["--parallelism.data_parallel_replicate_degree", str(cfg.dp),
                "--parallelism.data_parallel_shard_degree", "1"] if cfg.zero == 0 or cfg.dp == 1 else
               ["--parallelism.data_parallel_replicate_degree", "1",
                "--parallelism.data_parallel_shard_degree", str(cfg.dp),
                "--parallelism.fsdp_reshard_after_forward", RESHARD[cfg.zero]])
    flavour = flavour_of(plan.model)
    args = ["--module", MODULES[flavour], "--config", flavour, *dp_args,
            "--parallelism.tensor_parallel_degree", str(cfg.tp),
            *(["--parallelism.expert_parallel_degree", str(cfg.ep)] if plan.model.moe is not None else []),
            "--parallelism.enable_sequence_parallel" if cfg.sp else "--parallelism.no-enable_sequence_parallel",
            "--parallelism.pipeline_parallel_degree", str(cfg.pp)]
    if cfg.pp > 1:
        # the whole step's micro-batches go through the pipeline: local batch = global / dp
        args += ["--parallelism.pipeline_parallel_schedule", SCHEDULES[cfg.schedule],
                 "--parallelism.pipeline_parallel_microbatch_size", str(cfg.mbs),
                 "--parallelism.module_fqns_per_model_part", *_chunk_modules(list(cfg.layers_per_stage)),
                 "--training.local_batch_size", str(t.global_batch // cfg.dp), "--training.disable_cuda_graphs"]
    else:   # one micro-batch per gradient-accumulation step
        args += ["--training.local_batch_size", str(cfg.mbs)]
        if plan.model.moe is not None:      # its all-to-all dispatcher syncs with the CPU: no CUDA graphs
            args.append("--training.disable_cuda_graphs")
    args += ["--training.global_batch_size", str(t.global_batch), "--training.seq_len", str(t.seq_len),
             "--training.mixed_precision_param", "float32" if t.precision == "fp32" else "bfloat16",
             "--training.mixed_precision_reduce", "float32",
             "--compile.enable" if engine_compiles(plan) else "--compile.no-enable",
             f"activation-checkpoint:{cfg.recompute}"]
    return args


def files(plan, adj: Adjusted) -> dict[str, str]:
    args = arguments(plan, adj)
    from planner.export.common import shell_line
    return {"args.json": json.dumps(args, indent=1) + "\n", "args.txt": shell_line(args),
            "launch.sh": launch_script(plan, TITLE, ["-m", "torchtitan.train"], args_file="args.txt"),
            "slurm.sbatch": slurm_script(plan, TITLE)}


# ---------------------------------------------------------------------------------------------- read back
def looks_like(items: list[str]) -> bool:
    return "--module" in items or any(x.startswith("--module=") for x in items)


def default_split(stages: int, layers: int, first_less: int, last_less: int) -> list[int]:
    """Blocks per chunk when no module list is given: the embedding counts as `first_less` layers and the head
    as `last_less`, and the effective layers split evenly, the remainder on the first chunks (torchtitan's rule
    in distributed/pipeline_parallel.py)."""
    if stages == 1:
        return [layers]
    effective = layers + first_less + last_less
    base, extra = divmod(effective, stages)
    counts = [base + (1 if j < extra else 0) for j in range(stages)]
    counts[0] -= first_less
    counts[-1] -= last_less
    if min(counts) < 1:
        raise InputError(f"{stages} stages leave a chunk without layers", field="--from")
    return counts


def _bool(a: dict, key: str, default: bool) -> bool:
    if f"--{key}" in a:
        values = a[f"--{key}"]
        return values == [] or values[0].lower() in ("true", "1")
    section, _, name = key.rpartition(".")
    if f"--{section}.no-{name}" in a or f"--{section}.no_{name}" in a:
        return False
    return default


def _key(a: dict, key: str) -> str:
    """tyro accepts both spellings (underscores or dashes) of a key."""
    dashed = key.replace("_", "-")
    return f"--{key}" if f"--{key}" in a or f"--{dashed}" not in a else f"--{dashed}"


def read(items: list[str], source: str, world_size: int) -> Launch:
    a = parse_arg_list(items)
    get_int = lambda key, default: take_int(a, _key(a, key), default, source)   # noqa: E731
    get_str = lambda key, default: take_str(a, _key(a, key), default, source)   # noqa: E731
    module, flavour = get_str("module", None), get_str("config", None)
    if flavour not in FLAVOURS or module != MODULES[flavour]:
        known = ", ".join(f"{MODULES[n]} {n}" for n in FLAVOURS)
        raise InputError(f"--module {module} --config {flavour} is not a model meshplan knows ({known})",
                         field=source)
    model = FLAVOURS[flavour]
    if (get_int("parallelism.context_parallel_degree", 1) or 1) > 1:
        raise InputError("--parallelism.context_parallel_degree: context parallelism is not modelled by meshplan",
                         field=source)
    ep = get_int("parallelism.expert_parallel_degree", 1)
    tp, pp = get_int("parallelism.tensor_parallel_degree", 1), get_int("parallelism.pipeline_parallel_degree", 1)
    replicate, shard = get_int("parallelism.data_parallel_replicate_degree", 1), \
        get_int("parallelism.data_parallel_shard_degree", -1)
    if shard == -1:
        shard = world_size // (tp * pp * replicate)
    if replicate > 1 and shard > 1:
        raise InputError(f"HSDP (replicate {replicate} x shard {shard}) is not modelled by meshplan", field=source)
    dp = replicate * shard
    if tp * pp * dp != world_size:
        raise InputError(f"tp {tp} x pp {pp} x dp {dp} != world size {world_size}", field=source)
    if model.moe is not None and (tp > 1 or (ep > 1 and replicate > 1)):
        raise InputError(f"mixture-of-experts layers under tp {tp} (torchtitan has no expert tensor parallelism) "
                         f"or ep {ep} over DDP replicas ({replicate}) are not modelled by meshplan (ep inside FSDP's "
                         f"shard dimension at tp 1 is)", field=source)
    if model.moe is None:
        ep = 1              # torchtitan: no effect for dense models
    reshard = get_str("parallelism.fsdp_reshard_after_forward", "default")
    # torchtitan's "default" reshards after forward except under pipeline parallelism
    zero = 0 if shard == 1 else (3 if reshard == "always" or (reshard == "default" and pp == 1) else 2)
    local = get_int("training.local_batch_size", 8)
    global_batch = get_int("training.global_batch_size", -1)
    if global_batch == -1:
        global_batch = local * dp
    if global_batch % (local * dp):
        raise InputError(f"global batch {global_batch} is not a multiple of local batch {local} x dp {dp}",
                         field=source)
    schedule_name = get_str("parallelism.pipeline_parallel_schedule", "1F1B")
    layers = [model.num_layers]
    mbs, schedule, vpp = local, "1f1b", 1
    if pp > 1:
        by_name = {v: k for k, v in SCHEDULES.items()}
        if schedule_name not in by_name:
            raise InputError(f"pipeline schedule {schedule_name} is not modelled ({', '.join(by_name)})",
                             field=source)
        schedule = by_name[schedule_name]
        mbs = get_int("parallelism.pipeline_parallel_microbatch_size", 1)
        layers = _chunks(a, model, pp, schedule, get_int, source)
        vpp = len(layers) // pp
    recompute = "none"
    for item in a:
        if item.startswith("activation-checkpoint:"):
            recompute = item.split(":", 1)[1]
    if recompute not in ("none", "selective", "full"):
        raise InputError(f"activation-checkpoint:{recompute} is not modelled (none, selective, full)", field=source)
    if get_str("training.dtype", "float32") != "float32":
        raise InputError("--training.dtype bfloat16 (pure bf16 training) is not modelled", field=source)
    precision = "fp32" if get_str("training.mixed_precision_param", "bfloat16") == "float32" else "bf16"
    from planner.loaders import parse_spec
    cfg = parse_spec(ParallelConfig, dict(tp=tp, pp=pp, dp=dp, ep=ep, vpp=vpp, mbs=mbs, zero=zero,
                                          recompute=recompute,
                                          sp=tp > 1 and _bool(a, "parallelism.enable_sequence_parallel", True),
                                          schedule=schedule, layers_per_stage=layers), source)
    return Launch(target=TARGET, source=source, model=model, config=cfg, global_batch=global_batch,
                  seq_len=get_int("training.seq_len", 2048), precision=precision, optimizer="adamw",
                  overlap_grad_reduce=True)


def _chunks(a: dict, model: ModelSpec, pp: int, schedule: str, get_int, source: str) -> list[int]:
    """Blocks per pipeline chunk from the module lists, layers per stage, or torchtitan's defaults."""
    parts = a.get(_key(a, "parallelism.module_fqns_per_model_part"))
    if parts:
        counts = []
        for j, part in enumerate(parts):
            names = [n for n in part.split(",") if n]
            counts.append(sum(1 for n in names if re.fullmatch(r"layers\.\d+", n)))
            if ("tok_embeddings" in names) != (j == 0) or (("lm_head" in names) != (j == len(parts) - 1)):
                raise InputError("meshplan models tok_embeddings on the first chunk and lm_head on the last",
                                 field=f"{source}: module_fqns_per_model_part")
        if len(counts) % pp or sum(counts) != model.num_layers:
            raise InputError(f"{len(counts)} chunks holding {sum(counts)} layers; pp {pp}, {model.num_layers} "
                             f"layers", field=f"{source}: module_fqns_per_model_part")
        return counts
    first = get_int("parallelism.pipeline_parallel_first_stage_less_layers", 1)
    last = get_int("parallelism.pipeline_parallel_last_stage_less_layers", 1)
    per_stage = get_int("parallelism.pipeline_parallel_layers_per_stage", None)
    if per_stage is not None:
        stages = -(-(model.num_layers + first + last) // per_stage)
    else:
        stages = pp * (2 if schedule == "interleaved" else 1)
    return default_split(stages, model.num_layers, first, last)
