"""Everything about a run that can be wrong before training starts, checked without torch (so that
`meshplan run` can refuse bad input before it launches anything, and every rank checks again).

Each check raises `planner.errors.InputError` (one line naming the field; exit 2).
"""

from __future__ import annotations

from planner.errors import InputError
from planner.layout import reversed_group
from planner.limits import check_option
from planner.outputs import check_writable_dir
from planner.plan import Plan
from planner.specs import ModelSpec
from planner.validate import beyond_dense_blocks, check_config
from runtime import checkpoint as ckpt
from runtime.data import check_data_file
from runtime.rank_layout import rank_devices


def check_mesh_order(plan: Plan) -> None:
    """InputError unless every TP, DP and expert-DP group runs on increasing processes: a DeviceMesh sub-group
    numbers its members by process (torch.distributed.new_group sorts them), so on a placement that reverses a
    group DTensor and FSDP2 would gather its shards out of the mesh's order and train another model."""
    devices = rank_devices(plan)
    bad = reversed_group(plan.config.dims, devices)
    if bad is not None:
        dim, group = bad
        raise InputError(f"the {dim} group of ranks {list(group)} is placed on processes "
                         f"{[devices[r] for r in group]}; the runtime needs every tp, dp and expert-dp group on "
                         f"increasing processes", field="rank_layout")


def unsupported(spec: ModelSpec) -> str | None:
    """Why runtime/models.py cannot build `spec` (None when it can): GPT-2 and Llama blocks, and Llama blocks
    with dropless softmax-routed SwiGLU experts (runtime/moe.py)."""
    moe = spec.moe
    if moe is not None:
        for field, value, plain in (("moe.router", moe.router, "softmax"), ("moe.capacity_factor",
                                    moe.capacity_factor, None), ("moe.shared_expert_gate", moe.shared_expert_gate,
                                    False), ("mlp", spec.mlp, "swiglu"), ("bias", spec.bias, False)):
            if value != plain:
                return f"the runtime builds mixture-of-experts layers only with {field} {plain} (got {value})"
    field = beyond_dense_blocks(spec.model_copy(update={"moe": None}))
    return f"the runtime does not build models with {field} yet (GPT-2 and Llama blocks only)" if field else None


def check_run(plan: Plan, world_size: int, args) -> None:
    """Everything that can be wrong before training starts, for `world_size` processes; `args` carries
    steps, checkpoint_every, checkpoint_dir, resume, force, data and data_dtype (runtime.train's
    arguments)."""
    cfg = plan.config
    if plan.world_size != world_size:
        raise InputError(f"the plan is for {plan.world_size} processes (tp {cfg.tp} x pp {cfg.pp} x dp {cfg.dp}) "
                         f"but {world_size} were started", field="plan")
    check_config(plan.model, plan.cluster, plan.training, cfg)
    why = unsupported(plan.model)
    if why:
        raise InputError(why, field="plan.model")
    if not cfg.layers_per_stage or len(cfg.layers_per_stage) != cfg.pp * cfg.vpp:
        raise InputError("the plan has no layers_per_stage with pp*vpp entries", field="plan.config")
    if cfg.num_microbatches != cfg.microbatches(plan.training.global_batch):
        raise InputError(f"num_microbatches {cfg.num_microbatches} is not global_batch / (dp * mbs) = "
                         f"{cfg.microbatches(plan.training.global_batch)}", field="plan.config")
    if cfg.pp > 1 and cfg.schedule != "gpipe" and cfg.num_microbatches < cfg.pp:
        raise InputError(f"1F1B needs at least as many micro-batches ({cfg.num_microbatches}) as stages "
                         f"({cfg.pp})", field="plan.config")
    check_mesh_order(plan)
    for value, field in ((args.steps, "--steps"), (args.checkpoint_every, "--checkpoint-every"),
                         (args.seed, "--seed"), (args.lr, "--lr")):
        check_option(value, field)
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        raise InputError("needs --checkpoint-dir", field="--checkpoint-every" if args.checkpoint_every else "--resume")
    if args.checkpoint_every:
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir", create=True)
    if args.checkpoint_every and not (args.resume or args.force) and ckpt.latest(args.checkpoint_dir) is not None:
        raise InputError(f"'{args.checkpoint_dir}' holds checkpoints of an earlier run; pass --resume to continue "
                         f"it or --force to start over", field="--checkpoint-dir")
    if args.data is not None:
        check_data_file(args.data, args.data_dtype, plan.training.seq_len, plan.model.vocab_size)

