"""DeepSpeed: a plan as a `ds_config.json`, and such a config (with the world size) read back.

Keys and defaults are those of DeepSpeed 0.19.8 (`deepspeed/runtime/config.py`, `zero/config.py`,
`tensor_parallel/config.py`). The config does not carry the model or the sequence length: the training script
builds the model, so `estimate --from` takes them from --model and --seq.
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.errors import InputError
from planner.export.common import (Adjusted, Launch, change_config, launch_script,
                                   overlaps_grad_reduce, resolved_config, slurm_script)
from planner.layout import DEFAULT_ORDER
from planner.partition import balanced_layers
from planner.specs import ParallelConfig

TARGET = "deepspeed"
TITLE = "a DeepSpeed training script"
OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


# ---------------------------------------------------------------------------------------------- export
def nearest(plan) -> Adjusted:
    cfg, training, changes = resolved_config(plan), plan.training, []
    m = plan.model
    if m.mla is not None and cfg.tp > 1:
        raise InputError(f"DeepSpeed's AutoTP shards Linear layers by name, which does not give multi-head latent "
                         f"attention's duplicated down projections that meshplan costs: export a plan of "
                         f"{m.name} with tp 1 (this one has tp {cfg.tp}), or --to megatron", field="--to deepspeed")
    if m.moe is not None:
        _check_moe(m, cfg)
    if cfg.tp > 1 and cfg.pp > 1:
        raise InputError(f"DeepSpeed's config expresses tensor parallelism only as AutoTP "
                         f"(tensor_parallel.autotp_size), which its pipeline engine does not combine with; tp "
                         f"{cfg.tp} with pp {cfg.pp} needs Megatron-DeepSpeed (--to megatron writes its arguments)",
                         field="--to deepspeed")
    if cfg.recompute == "selective":
        cfg = change_config(cfg, recompute="full")
        changes.append("recompute selective -> full: DeepSpeed's activation checkpointing recomputes whole layers")
    if cfg.sp:
        cfg = change_config(cfg, sp=False)
        changes.append("sequence parallelism off: DeepSpeed's AutoTP has no Megatron-style sequence parallelism")
    if cfg.pp > 1:
        even = balanced_layers(m.num_layers, cfg.pp)
        if cfg.schedule != "1f1b":
            changes.append(f"schedule {cfg.schedule}{f' (vpp {cfg.vpp})' if cfg.vpp > 1 else ''} -> 1f1b with "
                           f"{','.join(map(str, even))} layers per stage: DeepSpeed's pipeline engine runs its 1F1B "
                           f"TrainSchedule only")
            cfg = change_config(cfg, schedule="1f1b", vpp=1, layers_per_stage=even)
        if list(cfg.layers_per_stage) != even:
            changes.append(f"layers per stage {','.join(map(str, cfg.layers_per_stage))} -> "
                           f"{','.join(map(str, even))}: DeepSpeed's PipelineModule splits by a method "
                           f"(partition 'uniform'), not by a list")
            cfg = change_config(cfg, layers_per_stage=even)
        if cfg.zero >= 2:
            changes.append(f"ZeRO {cfg.zero} -> 1: DeepSpeed's pipeline engine refuses ZeRO-2 and ZeRO-3")
            cfg = change_config(cfg, zero=1)
    if cfg.zero == 0 and cfg.dp > 1 and overlaps_grad_reduce(plan):
        training = training.model_copy(update={"overlap_grad_reduce": False})
        changes.append("gradient all-reduce after the backward: DeepSpeed overlaps the reduction (overlap_comm) "
                       "only under ZeRO 1-3")
    order = tuple(plan.config.layout)
    if order != DEFAULT_ORDER:
        changes.append(f"rank order {','.join(order)} -> tp,dp,pp: DeepSpeed's topologies order model, data, "
                       f"pipe from fastest")
    if plan.config.placement is not None:
        changes.append("rank placement dropped: the DeepSpeed launch runs global rank r on GPU r of the node list")
    return Adjusted(cfg, training, DEFAULT_ORDER, tuple(changes))


def _check_moe(m, cfg: ParallelConfig) -> None:
    """What DeepSpeed's AutoEP (the ds_config `expert_parallel` section, 0.19.8) cannot run as meshplan costs it."""
    if cfg.tp > 1:
        raise InputError(f"DeepSpeed's AutoEP has no expert tensor parallelism (expert_tensor_parallel_size must be "
                         f"1; with AutoTP it spreads whole experts over the TP ranks), which meshplan does not "
                         f"model: export a MoE plan with tp 1 (this one has tp {cfg.tp}), or --to megatron",
                         field="--to deepspeed")
    if m.moe.capacity_factor is not None:
        raise InputError(f"DeepSpeed's AutoEP routes dropless; the model's capacity factor "
                         f"{m.moe.capacity_factor} has no ds_config key (--to megatron writes it)",
                         field="--to deepspeed")


def config(plan, adj: Adjusted) -> dict:
    """The ds_config dictionary."""
    from planner.cost.params import mean_layer_params
    cfg, t = adj.config, adj.training
    block = round(mean_layer_params(plan.model).per_tp_rank(cfg.tp, cfg.ep))   # the cost model's bucket: one block
    ds: dict = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": cfg.mbs,
                "gradient_accumulation_steps": t.global_batch // (cfg.mbs * cfg.dp)}
    zero: dict = {"stage": cfg.zero}
    if cfg.zero >= 1:
        overlap = (t.overlap_grad_reduce if t.overlap_grad_reduce is not None
                   else plan.engine.overlap.grad_reduce == "during_backward")
        zero.update(overlap_comm=overlap, contiguous_gradients=True, reduce_bucket_size=block)
    if cfg.zero in (1, 2):
        zero.update(allgather_bucket_size=block)
    if cfg.zero == 3:
        zero.update(stage3_prefetch_bucket_size=block, stage3_param_persistence_threshold=0)
    ds["zero_optimization"] = zero
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":    # dynamic loss scaling from 2^16 (loss_scale 0 = dynamic)
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    elif t.precision == "amp-bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds["optimizer"] = {"type": OPTIMIZERS[t.optimizer]}
    if cfg.tp > 1:
        ds["tensor_parallel"] = {"autotp_size": cfg.tp}
    moe = plan.model.moe
    if moe is not None and cfg.ep > 1:
        # AutoEP replaces the Hugging Face model's MoE blocks: experts over ep consecutive ranks, the rest data
        # parallel; the model's own router settings, pinned to the plan's
        ds["expert_parallel"] = {"enabled": True, "autoep_size": cfg.ep, "expert_tensor_parallel_size": 1,
                                 "top_k": moe.top_k, "score_func": moe.router}
    if cfg.recompute != "none":
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                          "cpu_checkpointing": False}
    if cfg.pp > 1:
        ds["pipeline"] = {"stages": cfg.pp, "partition": "uniform",
                          "activation_checkpoint_interval": 1 if cfg.recompute != "none" else 0}
    return ds


def files(plan, adj: Adjusted) -> dict[str, str]:
    command = ['"${TRAIN_SCRIPT:?set TRAIN_SCRIPT to your DeepSpeed training script}"', "--deepspeed",
               "--deepspeed_config", '"$HERE/ds_config.json"', "${EXTRA_ARGS:-}"]
    return {"ds_config.json": json.dumps(config(plan, adj), indent=1) + "\n",
            "launch.sh": launch_script(plan, TITLE, command), "slurm.sbatch": slurm_script(plan, TITLE)}


# ---------------------------------------------------------------------------------------------- read back
def looks_like(data) -> bool:
    return isinstance(data, dict) and any(k in data for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                              "zero_optimization"))


def _int(ds: dict, key: str, source: str, default=None):
    value = ds.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InputError(f"{key} must be a whole number >= 1 (got {value!r})", field=source)
    return value


def read(ds: dict, source: str, world_size: int) -> Launch:
    """A ds_config dictionary and the job's world size -> Launch (model and sequence length: None)."""
    tp_section = ds.get("tensor_parallel") or {}
    tp = _int(tp_section, "autotp_size", f"{source}: tensor_parallel", 1) if tp_section.get("autotp_size") else 1
    pipeline = ds.get("pipeline") or {}
    batch, mbs = _int(ds, "train_batch_size", source), _int(ds, "train_micro_batch_size_per_gpu", source)
    gas = _int(ds, "gradient_accumulation_steps", source)
    stages = pipeline.get("stages", "auto")
    if stages != "auto" and (not isinstance(stages, int) or stages < 1):
        raise InputError(f"stages must be a whole number or 'auto' (got {stages!r})", field=f"{source}: pipeline")
    if batch is not None and mbs is not None and gas is not None:
        if batch % (mbs * gas):
            raise InputError(f"train_batch_size {batch} is not micro batch {mbs} x gradient accumulation {gas} x "
                             f"a data-parallel size", field=source)
        dp = batch // (mbs * gas)
    else:   # DeepSpeed derives what is missing from the data-parallel size (gradient accumulation 1 by default)
        dp = world_size // (tp * (stages if isinstance(stages, int) else 1))
        if dp < 1:
            raise InputError(f"the world size {world_size} is smaller than tp {tp} x pipeline stages", field=source)
        if batch is None:
            if mbs is None or gas is None:
                raise InputError("needs train_batch_size, or train_micro_batch_size_per_gpu with "
                                 "gradient_accumulation_steps", field=source)
            batch = mbs * gas * dp
        elif mbs is None:
            gas = gas or 1
            mbs = batch // (gas * dp)
        else:
            gas = batch // (mbs * dp)
        if min(mbs, gas) < 1:
            raise InputError(f"train_batch_size {batch} is smaller than micro batch x data-parallel size {dp}",
                             field=source)
    if world_size % (tp * dp):
        raise InputError(f"world size {world_size} is not a multiple of tp {tp} x data-parallel {dp} (from the "
                         f"batch sizes)", field=source)
    pp = world_size // (tp * dp)
    if isinstance(stages, int) and stages != pp:
        raise InputError(f"pipeline.stages {stages} but the world size {world_size} / (tp {tp} x data-parallel "
                         f"{dp}) = {pp}", field=source)
    if mbs * gas * dp != batch:
        raise InputError(f"train_batch_size {batch} != micro batch {mbs} x gradient accumulation {gas} x "
                         f"data-parallel {dp}", field=source)
    zero_section = ds.get("zero_optimization") or {}
    zero = zero_section.get("stage", 0)
    if zero not in (0, 1, 2, 3):
        raise InputError(f"stage {zero!r} is not 0, 1, 2 or 3", field=f"{source}: zero_optimization")
    # DeepSpeed's default overlap_comm: on for ZeRO-3, off otherwise; ZeRO-0 all-reduces after the backward
    overlap = bool(zero_section.get("overlap_comm", zero == 3)) and zero >= 1
    enabled = lambda key: bool((ds.get(key) or {}).get("enabled", False))   # noqa: E731
    if enabled("bf16") or enabled("bfloat16"):
        precision = "bf16"
    elif enabled("fp16"):
        precision = "fp16"
    elif enabled("torch_autocast"):
        precision = "amp-bf16"
    else:
        precision = "fp32"
    checkpointing = "activation_checkpointing" in ds or int(pipeline.get("activation_checkpoint_interval", 0) or 0) > 0
    opt_type = ((ds.get("optimizer") or {}).get("type") or "").lower()
    optimizer = {"adamw": "adamw", "adam": "adam", "fusedadam": "adam", "sgd": "sgd"}.get(opt_type)
    if opt_type and optimizer is None:
        raise InputError(f"optimizer type '{opt_type}' is not modelled (Adam, AdamW, SGD)", field=source)
    expert = ds.get("expert_parallel") or {}
    ep, routing = 1, None
    if expert.get("enabled", False):
        top_k, router = expert.get("top_k", "auto"), expert.get("score_func", "auto")
        if top_k != "auto" and router != "auto":
            routing = (top_k, router)
        ep = expert.get("autoep_size", 1)
        if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
            raise InputError(f"autoep_size must be a whole number >= 1 (got {ep!r})",
                             field=f"{source}: expert_parallel")
        if expert.get("expert_tensor_parallel_size", 1) != 1:
            raise InputError("expert_tensor_parallel_size other than 1 is not modelled",
                             field=f"{source}: expert_parallel")
        if ep > 1 and tp > 1:
            raise InputError(f"AutoEP folded over AutoTP ranks (autoep_size {ep}, autotp_size {tp}) is not modelled "
                             f"by meshplan", field=f"{source}: expert_parallel")
    from planner.loaders import parse_spec
    cfg = parse_spec(ParallelConfig, dict(tp=tp, pp=pp, dp=dp, ep=ep, mbs=mbs, zero=zero,
                                          recompute="full" if checkpointing else "none"), source)
    return Launch(target=TARGET, source=source, model=None, config=cfg, global_batch=batch, seq_len=None,
                  precision=precision, optimizer=optimizer, overlap_grad_reduce=overlap, routing=routing)


def read_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"'{path}' is not valid JSON (line {exc.lineno})", field="--from") from None
    except RecursionError:
        raise InputError(f"'{path}' is nested too deeply", field="--from") from None
    if not looks_like(data):
        raise InputError(f"'{path}' is not a DeepSpeed config (no train_batch_size / "
                         f"train_micro_batch_size_per_gpu)", field="--from")
    return data
