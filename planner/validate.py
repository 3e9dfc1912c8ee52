"""Check that a parallel configuration fits the model, the cluster and the batch; one InputError if not."""

from __future__ import annotations

import math

from planner.errors import InputError
from planner.partition import balanced_layers
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec


def prime_factors(n: int) -> dict[int, int]:
    """{prime: exponent} of n >= 1 by trial division up to sqrt(n): at most ~sqrt(n)/2 divisions, about 3,000
    for the largest number meshplan accepts (planner.limits), however many divisors n has."""
    out: dict[int, int] = {}
    for p in (2, 3):
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
    p = 5
    while p * p <= n:                      # candidates 6k - 1 and 6k + 1
        for q in (p, p + 2):
            while n % q == 0:
                out[q] = out.get(q, 0) + 1
                n //= q
        p += 6
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def divisors(n: int) -> list[int]:
    """The divisors of n >= 1 in increasing order, built from its prime factorisation (time grows with the
    number of divisors, not with n)."""
    out = [1]
    for p, k in prime_factors(n).items():
        out = [d * p ** e for d in out for e in range(k + 1)]
    return sorted(out)


def tp_shards(model: ModelSpec, tp: int) -> str | None:
    """Why a tensor-parallel degree cannot split this model's layers evenly (None when it can): it must divide
    heads, kv heads and the MLP width, which the runtime shards evenly (Megatron-LM asserts the same); the
    vocabulary is padded instead (planner.cost.params.padded_vocab_size)."""
    experts = (("moe.expert_ffn_size", model.moe.expert_ffn_size),) if model.moe else ()
    shared = (("moe.shared_ffn_size", model.moe.shared_width),) if model.moe and model.moe.shared_width else ()
    for name, value in (("num_heads", model.num_heads), ("num_kv_heads", model.kv_heads),
                        ("ffn_hidden_size", model.ffn_size), *experts, *shared):
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
    if cfg.pp > 1 and cfg.zero > engine.pipeline_max_zero:
        raise InputError(f"engine {name} runs at most ZeRO-{engine.pipeline_max_zero} with pipeline parallelism",
                         field="--zero")
    if cfg.sp and not engine.sequence_parallel:
        raise InputError(f"engine {name} has no sequence parallelism", field="--sp")
    if engine.layer_split == "balanced" and cfg.layers_per_stage and model is not None:
        even = balanced_layers(model.num_layers, cfg.pp * cfg.vpp)
        if list(cfg.layers_per_stage) != even:
            raise InputError(f"engine {name} splits the blocks over its stages itself ({','.join(map(str, even))}), "
                             f"not by a list", field="--layers-per-stage")
    if training.precision not in engine.memory:
        raise InputError(f"engine {name} does not train in {training.precision} (it runs "
                         f"{', '.join(engine.memory)})", field="--precision")
    if model is not None and model.vocab_size % (engine.memory_extras.vocab_multiple * cfg.tp):
        if engine.memory_extras.vocab_multiple == 1:
            raise InputError(f"engine {name} does not pad the vocabulary: tp {cfg.tp} must divide vocab_size "
                             f"{model.vocab_size}", field="--tp")


def valid_tp(model: ModelSpec, gpus: int | None = None) -> list[int]:
    """Every tensor-parallel degree that shards this model (and divides `gpus` when given)."""
    common = math.gcd(model.kv_heads, model.ffn_size)      # kv heads divide heads
    if model.moe:
        common = math.gcd(common, model.moe.expert_ffn_size, model.moe.shared_width)
    return divisors(math.gcd(common, gpus) if gpus else common)


def beyond_dense_blocks(spec: ModelSpec) -> str | None:
    """The first field of `spec` beyond a GPT-2 / Llama block (what runtime/models.py builds and the exports
    write), e.g. 'moe' or 'sliding_window'; None for a plain dense model."""
    for field, plain in (("moe", None), ("mla", None), ("qk_norm", "none"), ("sandwich_norm", False), ("sliding_window", None),
                         ("attention_chunk", None)):
        if getattr(spec, field) != plain:
            return field
    if spec.mlp == "geglu":
        return "mlp geglu"
    if spec.head_dim not in (None, spec.hidden_size // spec.num_heads):
        return "head_dim"
    return None


def expert_shards(model: ModelSpec, ep: int, dp: int) -> str | None:
    """Why an expert-parallel degree cannot shard this model's experts inside dp (None when it can)."""
    if ep == 1:
        return None
    if model.moe is None:
        return f"ep {ep} needs a mixture-of-experts model ({model.name} is dense)"
    if dp % ep:
        return f"ep {ep} does not divide dp {dp} (experts are sharded inside the data-parallel group)"
    if model.moe.num_experts % ep:
        return f"ep {ep} does not divide num_experts {model.moe.num_experts}"
    return None


def check_experts(model: ModelSpec, cfg: ParallelConfig) -> None:
    """ep against the model and dp; a MoE layer under tp > 1 needs sequence parallelism (Megatron-Core's rule)."""
    why = expert_shards(model, cfg.ep, cfg.dp)
    if why:
        valid = [e for e in divisors(cfg.dp) if expert_shards(model, e, cfg.dp) is None]
        raise InputError(f"{why} (valid ep: {', '.join(map(str, valid))})", field="--ep")
    if model.moe is not None and cfg.tp > 1 and not cfg.sp:
        raise InputError(f"tp {cfg.tp} with mixture-of-experts layers needs sequence parallelism (--sp), as "
                         f"Megatron-Core requires", field="--sp")


def check_config(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, cfg: ParallelConfig,
                 engine=None) -> None:
    """Raise InputError naming the offending field and the valid choices."""
    if engine is not None:
        check_engine(engine, training, cfg, model)
    why = tp_shards(model, cfg.tp)
    if why:
        raise InputError(f"{why} (valid tp: {', '.join(map(str, valid_tp(model)))})", field="--tp")
    gpus = cluster.world_size
    if cfg.num_gpus != gpus:
        raise InputError(f"tp*pp*dp = {cfg.tp}*{cfg.pp}*{cfg.dp} = {cfg.num_gpus} but the cluster has {gpus} "
                         f"GPUs ({cluster.num_nodes} nodes x {cluster.gpus_per_node}); with tp {cfg.tp} and "
                         f"pp {cfg.pp}, dp must be {gpus // (cfg.tp * cfg.pp)}"
                         if gpus % (cfg.tp * cfg.pp) == 0 else
                         f"tp*pp = {cfg.tp * cfg.pp} does not divide the cluster's {gpus} GPUs",
                         field="--dp")
    if training.global_batch % (cfg.dp * cfg.mbs):
        valid = divisors(training.global_batch // cfg.dp) if training.global_batch % cfg.dp == 0 else []
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
    check_experts(model, cfg)
    if model.attention_chunk is not None and training.seq_len > model.attention_chunk:
        raise InputError(f"seq {training.seq_len} exceeds the model's attention_chunk {model.attention_chunk}: "
                         f"chunked local attention is modelled only up to one chunk", field="--seq")
    if cfg.sp and training.seq_len % cfg.tp:
        raise InputError(f"sequence parallelism needs seq {training.seq_len} divisible by tp {cfg.tp}",
                         field="--sp")
    if model.position_embedding == "learned" and training.seq_len > model.max_position_embeddings:
        raise InputError(f"seq {training.seq_len} exceeds the model's {model.max_position_embeddings} learned "
                         f"positions", field="--seq")
