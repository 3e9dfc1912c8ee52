"""What a training engine runs, and how: the data behind `--engine` (one file each in cluster_specs/engines/).

The same parallel configuration costs differently in Megatron-LM, DeepSpeed, torchtitan and meshplan's own
runtime (DESIGN.md Sec. 8): they run different kernels (fused or eager), keep different tensors under the
same recompute name, overlap different communication and keep model states in different recipes. An
`EngineSpec` says all of that as data; the cost model reads it and has no `if engine == ...` anywhere.
Units: seconds, bytes per parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator

from planner.specs import Precision

ENGINE_DIR = Path(__file__).resolve().parent.parent / "cluster_specs" / "engines"
ENGINES = ("meshplan", "torchtitan", "megatron", "deepspeed")
DEFAULT_ENGINE = "meshplan"

# Pieces of a block that an engine may run as one fused kernel each (otherwise they run as the chain of eager
# PyTorch kernels planner.cost.kernels lists for them); "projections": q/k/v and gate/up as one GEMM each.
Fusable = Literal["norm", "activation", "bias_dropout_add", "rope", "softmax", "cross_entropy", "projections"]
NEVER = 4   # `sharded_from` of a state that no ZeRO stage shards
RecipeName = Literal["bf16", "fp16", "amp-bf16", "amp-fp16", "fp32"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Kernels(_Spec):
    """Which kernels run."""

    attention: Literal["flash", "eager"] = Field(
        description="Attention kernel for models whose spec does not name one: flash (fused, no score matrix "
                    "kept) or eager (softmax(QK^T)V materialised, Megatron's fused scale-mask-softmax).")
    fused: list[Fusable] = Field(
        description="Elementwise pieces that run as one kernel each; the others run as eager PyTorch's chain of "
                    "kernels (e.g. RMSNorm: cast, square, mean, rsqrt, two multiplies).")
    gemm_efficiency: float = Field(
        1.0, gt=0, le=1, description="Share of the GPU's GEMM rate (its efficiency model) this engine's GEMM calls "
                                     "reach: library, operand layouts, version.")
    softmax_shapes: Literal["any", "megatron"] = Field(
        "any", description="Where the fused softmax of eager attention runs: any shape, or `megatron`: Megatron's "
                           "fused scale-mask-softmax only where micro-batch x local heads is a multiple of 4 and "
                           "16 < seq <= 4096 with seq a multiple of 4; elsewhere PyTorch's fallback in fp32.")
    grad_accumulation: Literal["fused", "hook", "autograd"] = Field(
        "fused", description="How each micro-batch's weight gradients join their accumulator: `fused` into the "
                             "weight-gradient GEMM (Megatron's --gradient-accumulation-fusion: no extra traffic); "
                             "`hook`: a separate add into it every micro-batch (Megatron-LM before that fusion: "
                             "main_grad.add_(grad)); `autograd`: PyTorch's AccumulateGrad, or FSDP2's unsharded "
                             "accumulator, adding every micro-batch after the first. Gradients reduce-scattered "
                             "each micro-batch accumulate as 1/dp shards, which is neglected.")
    gather_copy_out: bool = Field(
        False, description="ZeRO/FSDP: each parameter all-gather is followed, on the compute stream, by a copy out "
                           "of its flat buffer into the unsharded parameters (FSDP2's split_with_sizes_copy: the "
                           "gathered bytes read and written once more); false: gathered in place.")
    reduce_copy_in: bool = Field(
        False, description="Data parallelism: before each gradient reduction the wrapper copies the block's "
                           "gradients, on the compute stream, into one flat buffer of the reduction's dtype "
                           "(FSDP2's chunk_cat copy-in: the gradients read, the buffer written); false: reduced "
                           "from buffers the gradients were written into (Megatron's grad buffer).")
    compile_fuses: list[Fusable] = Field(
        default_factory=list,
        description="Pieces that `--compile` (torch.compile of each block) fuses in addition; empty: the engine "
                    "has no --compile.")


class HookSeconds(_Spec):
    """Host seconds of a data-parallel wrapper's hooks around one wrapped block and pass: a fixed part and a part
    per parameter tensor."""

    forward_s: NonNegativeFloat = Field(description="Before and after the forward (gather, copy-out, reshard).")
    per_tensor_forward_s: NonNegativeFloat = Field(description="Forward: per parameter tensor of the block.")
    backward_s: NonNegativeFloat = Field(description="Around the backward (gather, reduce-scatter, copies).")
    per_tensor_backward_s: NonNegativeFloat = Field(description="Backward: per parameter tensor of the block.")

    def seconds(self, tensors: int) -> tuple[float, float]:
        """(forward, backward) host seconds for a block of `tensors` parameter tensors."""
        return (self.forward_s + self.per_tensor_forward_s * tensors,
                self.backward_s + self.per_tensor_backward_s * tensors)


class FsdpHooks(_Spec):
    """FSDP2's hooks per wrapped block (every block is one unit under data parallelism): `resharded` when the
    parameters are freed after the forward (ZeRO-3), `kept` when they stay gathered until the backward (ZeRO 1-2),
    `replicated` for ZeRO 0 when the engine runs it with FSDP2's replicate (none: a DDP-style reducer, whose
    hooks the per-collective cost covers)."""

    resharded: HookSeconds
    kept: HookSeconds
    replicated: HookSeconds | None = None

    def for_stage(self, zero: int, reshard_after_forward: bool) -> HookSeconds | None:
        """The hooks a block runs at this ZeRO stage."""
        if zero == 0:
            return self.replicated
        return self.resharded if zero >= 3 and reshard_after_forward else self.kept


class TpHostSeconds(_Spec):
    """Host seconds DTensor tensor parallelism adds to one block's pass (scripts/measure_tp_host.py): per sharded
    projection (its input and output converted, the op dispatched through sharding propagation) and, with sequence
    parallelism, per block (the norms' and the attention's and MLP's input conversions)."""

    per_projection_forward_s: NonNegativeFloat
    per_projection_backward_s: NonNegativeFloat
    sp_forward_s: NonNegativeFloat = 0.0
    sp_backward_s: NonNegativeFloat = 0.0

    def seconds(self, projections: int, sp: bool) -> tuple[float, float]:
        """(forward, backward) host seconds of a block with `projections` sharded projections."""
        return (self.per_projection_forward_s * projections + (self.sp_forward_s if sp else 0.0),
                self.per_projection_backward_s * projections + (self.sp_backward_s if sp else 0.0))


class HostCosts(_Spec):
    """Host (CPU) seconds the engine spends issuing work; the GPU idles when the host falls behind."""

    per_kernel_s: NonNegativeFloat = Field(description="One forward op: Python, dispatcher and launch.")
    per_backward_kernel_s: NonNegativeFloat = Field(description="One kernel of the backward (autograd engine).")
    per_collective_s: NonNegativeFloat = Field(description="Issuing one collective or point-to-point transfer.")
    per_microbatch_s: NonNegativeFloat = Field(
        description="Per micro-batch and pipeline stage: schedule, data loading and loss bookkeeping.")
    per_step_s: NonNegativeFloat = Field(
        description="Per optimizer step: zeroing gradients, gradient-norm and optimizer launches, logging.")
    optimizer_per_tensor_s: NonNegativeFloat = Field(
        0.0, description="Optimizer step, per plain parameter tensor: torch.optim's per-tensor loop (a CPU) or its "
                         "foreach kernels' list handling (CUDA); 0: one fused launch over flat buffers.")
    optimizer_per_dtensor_s: NonNegativeFloat = Field(
        0.0, description="The same per DTensor parameter (FSDP2-sharded or tensor-parallel), whose every op goes "
                         "through DTensor's dispatch.")
    compiled_kernel_factor: float = Field(
        1.0, gt=0, le=1, description="Host cost per kernel under --compile, as a fraction of eager's.")
    recompute_kernel_factor: float = Field(
        1.0, ge=0, description="Host seconds per recomputed kernel, as a multiple of a forward kernel's: "
                               "torch.utils.checkpoint replays a block from the autograd engine's unpack hook, "
                               "recording its graph again (1: a replay costs the host what a forward does).")
    checkpoint_forward_s: NonNegativeFloat = Field(
        0.0, description="Host seconds of entering one checkpointed region in the forward (torch.utils.checkpoint: "
                         "its saved-tensor hooks, the RNG state it keeps for the replay).")
    fsdp_hooks: FsdpHooks | None = Field(
        None, description="Host seconds of FSDP2's hooks around each wrapped block when dp > 1 (not reduced by "
                          "--compile: the hooks stay eager); none: the engine's data parallelism adds no per-block "
                          "host work that the per-collective cost leaves out.")
    tp_dtensor: TpHostSeconds | None = Field(
        None, description="Host seconds of DTensor tensor parallelism per block and pass when tp > 1 (times "
                          "compiled_kernel_factor under --compile, which traces the DTensor ops into each block's "
                          "graph); none: the engine's tensor parallelism is plain autograd functions (Megatron-LM).")


class Recompute(_Spec):
    """What each recompute mode keeps for the backward."""

    selective: Literal["attention_core", "save_every_other_matmul", "none"] = Field(
        description="attention_core: recompute softmax(QK^T)V only (Megatron; free with flash attention); "
                    "save_every_other_matmul: torchtitan's per-op policy (keep the outputs of the 1st, 3rd, ... "
                    "matmul of a block and of attention, recompute everything else); none: no selective mode.")
    full: Literal["block_input"] = Field("block_input", description="full keeps each block's input and replays "
                                                                     "the block before its backward.")


class Overlap(_Spec):
    """What runs under what."""

    grad_reduce: Literal["during_backward", "after_backward"] = Field(
        description="Data-parallel gradient reduction bucketed under the backward, or issued after it.")
    param_gather: Literal["next_forward", "after_step"] = Field(
        description="ZeRO-1/2 (distributed optimizer): the all-gather of updated parameters is prefetched under "
                    "the next forward (FSDP2, Megatron --overlap-param-gather) or runs after the step, exposed.")
    zero3_prefetch: bool = Field(description="ZeRO-3/FSDP: the next block's gather runs under the current block.")
    gather_window: float = Field(
        1.0, ge=0, le=1, description="ZeRO-3/FSDP: share of each pass's compute under which its parameter gathers can "
                                     "run (1: FSDP2's and Megatron's prefetch of the next block; less where a "
                                     "prefetch bucket bounds how far ahead the engine fetches).")
    reshard_after_forward: bool = Field(
        description="ZeRO-3/FSDP: parameters are freed after the forward and gathered again for the backward.")
    grad_sync_under_pipeline: Literal["every_microbatch", "last_microbatch"] = Field(
        description="ZeRO-2/3 with pp > 1: gradients reduce-scattered after every micro-batch's backward, or "
                    "accumulated unsharded and reduced once after the last (torch.distributed.pipelining).")
    dp_calls: Literal["block", "parameter"] = Field(
        "block", description="ZeRO-3's collectives issued once per block (FSDP2's per-module groups, Megatron's "
                             "buckets) or once per parameter tensor (DeepSpeed ZeRO-3's fetches): each call pays "
                             "the ring's latency. Below ZeRO-3 every engine reduces and gathers flat buckets, "
                             "about one per block.")
    zero3_rails: int = Field(
        0, ge=0, description="ZeRO-3: NICs of a node that one parameter gather or gradient reduce-scatter spanning "
                             "nodes moves its data over (0: all of them, NCCL's one ring per rail; 1: a ring that "
                             "crosses each node boundary on a single NIC, as small per-parameter calls over hundreds "
                             "of ranks get from NCCL, which opens fewer channels the less data each rank holds).")
    tp_comm_hidden: float = Field(
        0.0, ge=0, le=1, description="Share of tensor-parallel communication hidden under GEMMs (async TP).")
    ep_comm_hidden: float = Field(
        0.0, ge=0, le=1, description="Share of the expert-parallel all-to-alls hidden under compute (Megatron-Core's "
                                     "--overlap-moe-expert-parallel-comm; off by default in every engine).")
    pp_p2p: Literal["overlapped", "exposed"] = Field(
        description="Pipeline sends and receives: asynchronous beside compute, or blocking the stage.")
    dp_on_side_stream: list[int] = Field(
        default_factory=list,
        description="ZeRO stages whose data-parallel collectives the engine overlaps only by issuing them, "
                    "synchronously, on a side stream (FSDP2 and its replicate: dist.all_reduce / all_gather without "
                    "async_op). A device without streams (a CPU: async_launch false) runs them in line, all exposed.")


class StateTerm(_Spec):
    """One model state of a memory recipe."""

    bytes: NonNegativeFloat = Field(description="Bytes per parameter.")
    sharded_from: int = Field(NEVER, ge=1, le=NEVER,
                              description="Lowest ZeRO stage that shards it over data parallelism (4: never).")


class MemoryRecipe(_Spec):
    """How one precision keeps the model states (bytes per parameter) and what it computes in."""

    compute: Literal["bf16", "fp16", "fp32", "autocast-bf16", "autocast-fp16"] = Field(
        description="Activation dtype: 16-bit throughout, fp32, or autocast (16-bit matmuls over fp32 "
                    "parameters and an fp32 residual stream).")
    weights: StateTerm = Field(description="The parameters as stored between steps.")
    grads: StateTerm = Field(description="The gradients the optimizer reads.")
    master: StateTerm = Field(StateTerm(bytes=0), description="fp32 master weights (16-bit recipes).")
    moment_bytes: NonNegativeFloat = Field(4, description="Bytes per optimizer moment per parameter.")
    moments_sharded_from: int = Field(1, ge=1, le=NEVER)
    grads_held_between_steps: bool = Field(
        description="Gradient buffers persist across steps (Megatron's contiguous buffer); false: created by the "
                    "backward and freed by zero_grad(set_to_none=True).")
    gathered_weights_bytes: NonNegativeFloat = Field(
        0, description="FSDP: bytes per parameter of the unsharded compute copy it all-gathers (0: none).")
    gathered_grads_bytes: NonNegativeFloat = Field(
        0, description="FSDP: bytes per parameter of a block's unsharded gradient before its reduce-scatter.")
    accumulated_grads_bytes: NonNegativeFloat = Field(
        0, description="Bytes per parameter of unsharded gradients accumulated when reduction is deferred to the "
                       "last micro-batch (FSDP2 accumulates in its reduce dtype).")
    reduce_bytes: NonNegativeFloat = Field(description="Bytes per element of the gradient reduction.")
    gather_bytes: NonNegativeFloat = Field(description="Bytes per element of the parameter all-gather.")
    replicate_copy_bytes: NonNegativeFloat = Field(
        0, description="ZeRO 0 with dp > 1: bytes per parameter of the second, unsharded copy the data-parallel "
                       "wrapper keeps from the first forward to the end of the backward (FSDP2's replicate).")
    optimizer_temp_bytes: NonNegativeFloat = Field(
        0, description="Bytes per parameter the optimizer step allocates beside the states (torch's foreach Adam "
                       "keeps one fp32 temporary per parameter: the denominator sqrt(v)/c + eps).")
    optimizer_traffic_bytes: NonNegativeFloat = Field(
        description="Device-memory bytes per parameter read and written by one Adam step, grad-norm included.")
    loss_scaling: bool = False


class MemoryExtras(_Spec):
    """Buffers besides states and activations."""

    logits_fp32: bool = Field(description="The loss reads an fp32 copy of the full-vocabulary logits.")
    sp_saves: Literal["sharded", "gathered"] = Field(
        description="Under sequence parallelism the QKV and MLP inputs are kept sequence-sharded and gathered "
                    "again in the backward (Megatron), or kept gathered (DTensor's PrepareModuleInput).")
    autocast_casts_per_linear: bool = Field(
        False, description="Autocast casts the fp32 input of each Linear separately, so q/k/v (and gate/up) each "
                           "keep their own 16-bit copy of one norm output.")
    vocab_multiple: int = Field(128, ge=1, description="Vocabulary padded to a multiple of this times tp.")
    embedding_grad_whole: bool = Field(
        False, description="Under tensor parallelism each rank keeps the token embedding's whole gradient (V x h), "
                           "not its vocabulary shard (DTensor's row-wise embedding, measured by "
                           "profiler.memory_trace).")
    pipeline_buffers: Literal["all_microbatches", "in_flight"] = Field(
        "in_flight", description="Pipeline receive buffers: one per micro-batch of the step, kept all step "
                                 "(torch.distributed.pipelining), or only those in flight (Megatron).")


class EngineSpec(_Spec):
    """A training engine: kernels, recompute semantics, overlap, memory recipes, host costs and what it runs."""

    name: str
    description: str = ""
    zero_stages: list[Literal[0, 1, 2, 3]] = Field(description="ZeRO stages it can run.")
    schedules: list[Literal["gpipe", "1f1b", "interleaved"]]
    recompute_modes: list[Literal["none", "selective", "full"]]
    sequence_parallel: bool
    pipeline_max_zero: Literal[0, 1, 2, 3] = Field(
        3, description="The highest ZeRO stage it runs with pipeline parallelism (DeepSpeed's PipelineEngine "
                       "refuses ZeRO-2 and ZeRO-3).")
    layer_split: Literal["any", "balanced"] = Field(
        "any", description="How the engine splits blocks over pipeline stages: `any` list the plan gives, or "
                           "`balanced`: its own near-equal split, the remainder on the first stages (DeepSpeed's "
                           "PipelineModule: partition 'uniform', or 'type:transformer' as Megatron-DeepSpeed's "
                           "GPTModelPipe), which plans then use.")
    compile: bool = Field(False, description="Whether `--compile` is on for this estimate (set by the CLI).")
    kernels: Kernels
    host: HostCosts
    recompute: Recompute
    overlap: Overlap
    memory: dict[RecipeName, MemoryRecipe] = Field(description="Memory recipe of each precision it runs.")
    memory_extras: MemoryExtras
    zero0_recipe: dict[Precision, RecipeName] = Field(
        default_factory=dict,
        description="Precisions that run another precision's recipe when nothing is sharded (ZeRO 0 or dp 1): "
                    "meshplan's bf16 without FSDP is autocast over fp32 parameters (amp-bf16).")

    @model_validator(mode="after")
    def _check(self) -> "EngineSpec":
        for src, dst in self.zero0_recipe.items():
            if dst not in self.memory:
                raise ValueError(f"zero0_recipe maps {src} to {dst}, which has no memory recipe")
        if "fp32" not in self.memory:
            raise ValueError("memory needs an fp32 recipe (what runs on CPUs)")
        if self.recompute.selective == "none" and "selective" in self.recompute_modes:
            raise ValueError("recompute_modes lists selective but recompute.selective is none")
        if self.compile and not self.kernels.compile_fuses:
            raise ValueError(f"engine {self.name} has no --compile (kernels.compile_fuses is empty)")
        return self

    @property
    def fused(self) -> frozenset[str]:
        """The elementwise pieces that run fused, --compile included."""
        extra = self.kernels.compile_fuses if self.compile else []
        return frozenset(self.kernels.fused) | frozenset(extra)

    @property
    def host_per_kernel(self) -> tuple[float, float]:
        """(forward, backward) host seconds per kernel."""
        k = self.host.compiled_kernel_factor if self.compile else 1.0
        return self.host.per_kernel_s * k, self.host.per_backward_kernel_s * k

    def tp_host_seconds(self, projections: int, sp: bool) -> tuple[float, float]:
        """(forward, backward) host seconds DTensor tensor parallelism adds to a block (host.tp_dtensor)."""
        if self.host.tp_dtensor is None:
            return 0.0, 0.0
        k = self.host.compiled_kernel_factor if self.compile else 1.0
        forward, backward = self.host.tp_dtensor.seconds(projections, sp)
        return forward * k, backward * k

    def recipe(self, precision: str, zero: int, dp: int) -> MemoryRecipe:
        """The memory recipe `precision` runs with at this ZeRO stage and data-parallel degree."""
        if zero == 0 or dp == 1:
            precision = self.zero0_recipe.get(precision, precision)
        return self.memory[precision]

    def label(self) -> str:
        return self.name + (" (compiled)" if self.compile else "")


def run_precision(precision: str, device_type: str) -> str:
    """The precision a plan's `precision` computes in on this device type ("cuda" or "cpu"): as planned on
    CUDA; fp32 on CPU, where 16-bit matmuls are far slower than fp32 (what `meshplan run` does, and so what
    every engine is costed with on a gloo cluster)."""
    return precision if device_type == "cuda" else "fp32"


def engine_names() -> list[str]:
    return sorted(p.stem for p in ENGINE_DIR.glob("*.yaml"))


def load_engine(arg: str = DEFAULT_ENGINE, compile: bool = False) -> EngineSpec:
    """A built-in engine (cluster_specs/engines/NAME.yaml) or an engine YAML/JSON file; `compile` turns on its
    --compile (an InputError when it has none)."""
    from planner.errors import InputError
    from planner.loaders import parse_spec, read_data_file
    path = ENGINE_DIR / f"{arg}.yaml"
    if not path.is_file():
        path = Path(arg)
        if not path.exists():
            raise InputError(f"'{arg}' is neither a built-in engine ({', '.join(engine_names())}) nor an "
                             f"existing file", field="--engine")
    spec = parse_spec(EngineSpec, read_data_file(path, "--engine"), str(path))
    if compile:
        if not spec.kernels.compile_fuses:
            raise InputError(f"engine {spec.name} has no torch.compile mode (only the PyTorch engines do)",
                             field="--compile")
        spec = spec.model_copy(update={"compile": True})
    return spec


def with_overrides(engine: EngineSpec, overrides: dict[str, float]) -> EngineSpec:
    """A copy of `engine` with dotted-path values replaced (e.g. {"host.per_kernel_s": 2e-3})."""
    if not overrides:
        return engine
    data = engine.model_dump()
    for path, value in overrides.items():
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(path)
        node[parts[-1]] = value
    return EngineSpec.model_validate(data)


def engine_on(engine: EngineSpec, cluster) -> EngineSpec:
    """The engine as it behaves on `cluster`: its `engine_overrides` for this engine applied."""
    from planner.errors import InputError
    try:
        return with_overrides(engine, cluster.engine_overrides.get(engine.name, {}))
    except (KeyError, TypeError):
        raise InputError(f"engine_overrides.{engine.name} names a field engine {engine.name} does not have",
                         field=cluster.name) from None
