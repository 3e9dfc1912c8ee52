"""Check that a parallel configuration fits the model, the cluster and the batch; one InputError if not."""

from __future__ import annotations

from planner.errors import InputError
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_shards(model: ModelSpec, tp: int) -> str | None:
    """Why a tensor-parallel degree cannot split this model's layers evenly (None when it can): it must divide
    heads, kv heads, MLP width and vocabulary (the runtime shards all four; Megatron pads the vocabulary)."""
    for name, value in (("num_heads", model.num_heads), ("num_kv_heads", model.kv_heads),
                        ("ffn_hidden_size", model.ffn_size), ("vocab_size", model.vocab_size)):
        if value % tp:
            return f"tp {tp} does not divide {name} {value}"
    return None


def check_engine(engine, training: TrainingSpec, cfg: ParallelConfig, model: ModelSpec | None = None) -> None:
    """Raise InputError when the engine cannot run `cfg` (planner/engine.py lists what each runs)."""
    name = engine.name
    for value, allowed, field in ((cfg.zero, engine.zero_stages, "--zero"), (cfg.schedule, engine.schedules, "--schedule"),
                                  (cfg.recompute, engine.recompute_modes, "--recompute")):
        if value not in allowed and not (field == "--schedule" and cfg.pp == 1):
            raise InputError(f"engine {name} does not run {value} (it runs {', '.join(map(str, allowed))})",
                             field=field)
    if cfg.sp and not engine.sequence_parallel:
        raise InputError(f"engine {name} has no sequence parallelism", field="--sp")
    if training.precision not in engine.memory:
        raise InputError(f"engine {name} does not train in {training.precision} (it runs "
                         f"{', '.join(engine.memory)})", field="--precision")
    if model is not None and model.vocab_size % (engine.memory_extras.vocab_multiple * cfg.tp):
        if engine.memory_extras.vocab_multiple == 1:
            raise InputError(f"engine {name} does not pad the vocabulary: tp {cfg.tp} must divide vocab_size "
                             f"{model.vocab_size}", field="--tp")


def check_config(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, cfg: ParallelConfig,
                 engine=None) -> None:
    """Raise InputError naming the offending field and the valid choices."""
    if engine is not None:
        check_engine(engine, training, cfg, model)
    if model.num_heads % cfg.tp or model.kv_heads % cfg.tp:
        common = [d for d in divisors(model.kv_heads) if model.num_heads % d == 0]
        raise InputError(f"tp {cfg.tp} must divide num_heads {model.num_heads} and num_kv_heads "
                         f"{model.kv_heads} (valid: {', '.join(map(str, common))})", field="--tp")
    gpus = cluster.world_size
    if cfg.num_gpus != gpus:
        raise InputError(f"tp*pp*dp = {cfg.tp}*{cfg.pp}*{cfg.dp} = {cfg.num_gpus} but the cluster has {gpus} "
                         f"GPUs ({cluster.num_nodes} nodes x {cluster.gpus_per_node}); with tp {cfg.tp} and "
                         f"pp {cfg.pp}, dp must be {gpus // (cfg.tp * cfg.pp)}"
                         if gpus % (cfg.tp * cfg.pp) == 0 else
                         f"tp*pp = {cfg.tp * cfg.pp} does not divide the cluster's {gpus} GPUs",
                         field="--dp")
    if training.global_batch % (cfg.dp * cfg.mbs):
        valid = [b for b in divisors(training.global_batch) if (training.global_batch // b) % cfg.dp == 0]
        raise InputError(f"global batch {training.global_batch} is not divisible by dp*mbs = {cfg.dp}*{cfg.mbs}"
                         f" (valid mbs for dp {cfg.dp}: {', '.join(map(str, valid)) or 'none'})", field="--mbs")
    m = cfg.microbatches(training.global_batch)
    chunks = cfg.pp * cfg.vpp
    if chunks > model.num_layers:
        raise InputError(f"pp*vpp = {chunks} exceeds the model's {model.num_layers} layers", field="--pp")
    if cfg.schedule == "interleaved":
        if m % cfg.pp:
            raise InputError(f"interleaved 1F1B needs micro-batches ({m}) divisible by pp {cfg.pp} "
                             f"(Megatron-LM's and torch.distributed.pipelining's rule)", field="--schedule")
    if cfg.layers_per_stage is not None:
        if sum(cfg.layers_per_stage) != model.num_layers:
            raise InputError(f"layers_per_stage sums to {sum(cfg.layers_per_stage)}, the model has "
                             f"{model.num_layers} layers", field="layers_per_stage")
        if min(cfg.layers_per_stage) < 1:
            raise InputError("every pipeline chunk needs at least one layer", field="layers_per_stage")
    if cfg.sp and training.seq_len % cfg.tp:
        raise InputError(f"sequence parallelism needs seq {training.seq_len} divisible by tp {cfg.tp}",
                         field="--sp")
    if model.position_embedding == "learned" and training.seq_len > model.max_position_embeddings:
        raise InputError(f"seq {training.seq_len} exceeds the model's {model.max_position_embeddings} learned "
                         f"positions", field="--seq")
