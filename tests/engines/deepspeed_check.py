"""Run DeepSpeed's own config parser on meshplan exports; print what it read back, as JSON.

Usage (in the engine venv): python deepspeed_check.py JOBS.json, JOBS a list of {"dir", "dp", "world_size"}.
DeepSpeedConfig (DeepSpeed 0.19.8) takes its world size from deepspeed.comm, which without a process group
answers 1: the data-parallel size and rank 0 are patched in while it parses (../shared/engine-validation.md).
AutoEP's expert_parallel section is validated for the whole world (tp x pp x dp GPUs).
"""

import json
import logging
import os
import sys
from unittest import mock


def expert_parallel(cfg, world_size: int) -> dict:
    """AutoEP's own validation of the expert_parallel section for the job's world, and the rank tables it
    derives (deepspeed/module_inject/auto_ep_config.py, auto_ep_folding.py); {} when it is off."""
    from deepspeed.module_inject.auto_ep_config import validate_autoep_config
    from deepspeed.module_inject.auto_ep_folding import build_folding_spec, expected_folding_group_tables
    ep = cfg.expert_parallel_config
    if not ep.enabled:
        return {}
    tp, pp = max(cfg.tensor_parallel_config.autotp_size, 1), cfg.pipeline.get("stages", 1)
    pp = pp if isinstance(pp, int) else 1
    validate_autoep_config(ep, world_size, pp, tp, 1, zero_stage=cfg.zero_optimization_stage)
    spec = build_folding_spec(world_size=world_size, pp_size=pp, tp_size=tp, ep_size=ep.autoep_size,
                              etp_size=ep.expert_tensor_parallel_size, mp_mode="tp" if tp > 1 else "sp")
    tables = expected_folding_group_tables(spec)
    return {"ep": ep.autoep_size, "etp": ep.expert_tensor_parallel_size, "top_k": ep.top_k,
            "score_func": ep.score_func, "ep_ranks": list(tables.ep_groups[0]), "edp_ranks": list(tables.edp_groups[0])}


def check(directory: str, dp: int, world_size: int) -> dict:
    from deepspeed.runtime import config as ds_config
    path = os.path.join(directory, "ds_config.json")
    try:
        with mock.patch.object(ds_config.dist, "get_rank", return_value=0), \
                mock.patch.object(ds_config.dist, "get_world_size", return_value=dp):
            cfg = ds_config.DeepSpeedConfig(path)
            experts = expert_parallel(cfg, world_size)
    except (AssertionError, ValueError, ds_config.DeepSpeedConfigError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:    # pydantic's ValidationError for unknown or mistyped keys
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    zero = cfg.zero_config
    ac = cfg.activation_checkpointing_config
    return {
        "world_size": cfg.world_size, "train_batch_size": cfg.train_batch_size,
        "micro_batch": cfg.train_micro_batch_size_per_gpu, "gradient_accumulation": cfg.gradient_accumulation_steps,
        "zero_stage": cfg.zero_optimization_stage, "overlap_comm": bool(zero.overlap_comm),
        "reduce_bucket_size": int(zero.reduce_bucket_size), "allgather_bucket_size": int(zero.allgather_bucket_size),
        "prefetch_bucket_size": int(zero.prefetch_bucket_size),
        "bf16": cfg.bfloat16_config.enabled, "fp16": cfg.float16_config.enabled,
        "dynamic_loss_scale": cfg.float16_config.enabled and cfg.float16_config.loss_scale == 0,
        "torch_autocast": cfg.torch_autocast_enabled, "optimizer": cfg.optimizer_name,
        "autotp_size": cfg.tensor_parallel_config.autotp_size,
        "pipeline": cfg.pipeline, "activation_checkpointing": "activation_checkpointing" in cfg._param_dict,
        "partition_activations": ac.partition_activations, "expert_parallel": experts,
    }


def main() -> None:
    logging.disable(logging.WARNING)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = [check(job["dir"], job["dp"], job.get("world_size", job["dp"])) for job in jobs]
    print("\n" + json.dumps(results))      # the last line of stdout


if __name__ == "__main__":
    main()
