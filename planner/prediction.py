"""What the cost model predicts for one configuration: the JSON `meshplan estimate --json` prints and every
plan file carries (schema in README.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from planner.parallel_dims import ParallelDims
from planner.specs import ParallelConfig


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class StageMemory(_Out):
    """Peak bytes on one GPU of a pipeline stage (the fullest TP/DP rank of that stage)."""

    stage: int
    layers: int = Field(description="Transformer blocks on this stage (all its chunks).")
    params: int
    grads: int
    optimizer: int = Field(description="fp32 master weights and optimizer moments.")
    activations: int = Field(description="Activations kept for backward by the micro-batches in flight.")
    other: int = Field(description="Transient buffers: logits, backward working set, ZeRO-3 gathers, DP buckets.")
    total: int = Field(description="Sum of the above: the predicted max allocated bytes.")
    reserved: int = Field(description="total plus the allocator's margin.")
    peak_phase: str = Field("forward", description="Phase of the step where this stage peaks: forward, backward "
                                                   "or optimizer.")
    phases: dict[str, int] = Field(default_factory=dict,
                                   description="Allocated bytes at the peak of each phase (forward, backward, "
                                               "optimizer); `total` is the largest.")


class MemoryBreakdown(_Out):
    capacity_bytes: int = Field(description="Device memory.")
    usable_bytes: int = Field(description="capacity minus bytes outside the allocator (context, NCCL).")
    headroom: float = Field(0.0, description="Fraction of usable_bytes kept free (--memory-headroom).")
    budget_bytes: int | None = Field(None, description="usable_bytes * (1 - headroom): what the fullest GPU may "
                                                       "reserve in a feasible plan.")
    stages: list[StageMemory]


class TimeBreakdown(_Out):
    """Seconds of one step on the critical path; the fields sum to step_time_s."""

    compute: float = Field(description="Forward and backward kernels of the slowest stage, all micro-batches.")
    recompute: float = Field(description="Extra forward work of activation recomputation.")
    bubble: float = Field(description="Pipeline fill and drain the slowest stage waits through.")
    tp_comm: float = Field(description="Tensor-parallel collectives (not overlapped).")
    ep_comm: float = Field(0.0, description="Expert-parallel all-to-alls (token dispatch and combine of MoE layers, "
                                            "forward and backward; not overlapped).")
    pp_comm: float = Field(description="Pipeline sends and receives on the critical path.")
    dp_comm_exposed: float = Field(description="Data-parallel / ZeRO communication not hidden under compute.")
    optimizer: float = Field(description="Optimizer step.")
    host: float = Field(0.0, description="The engine's host overheads per micro-batch and per step (Python, "
                                         "schedule, loss bookkeeping); host time per kernel is inside compute.")


class Predicted(_Out):
    step_time_s: float
    tokens_per_s: float
    mfu: float = Field(description="Model FLOPs (no recompute; causal attention counted in full; of a mixture of "
                                   "experts, the active parameters': router, top-k and shared experts) per second "
                                   "over the GPUs' dense peak for the recipe's matmul dtype.")
    tflops_per_gpu: float = Field(description="Model TFLOP/s per GPU (the MFU numerator).")
    hardware_tflops_per_gpu: float = Field(description="TFLOP/s per GPU including recomputation.")
    peak_memory_bytes: int = Field(description="Bytes held by tensors on the fullest GPU (max allocated).")
    peak_reserved_bytes: int = Field(description="peak_memory_bytes plus the allocator margin; feasibility "
                                                 "compares it with memory.budget_bytes.")
    critical_stage: int = Field(description="Pipeline stage that sets the steady state.")
    binding: str = Field(description="What limits this configuration, in words.")
    memory: MemoryBreakdown
    time: TimeBreakdown
    sources: dict[str, str] = Field(default_factory=dict,
                                    description="Which numbers were measured (profile files) and which computed.")


class ResolvedConfig(ParallelConfig):
    """A ParallelConfig with its defaults resolved (layers per chunk, micro-batches per step)."""

    num_microbatches: int
    layout: list[str] = Field(default_factory=lambda: ["tp", "dp", "pp"],
                              description="Rank order, fastest-varying axis first.")
    placement: list[int] | None = Field(None, description="Device (node * gpus_per_node + local GPU) of each "
                                                          "rank, when not rank r on device r.")

    @property
    def dims(self) -> ParallelDims:
        """The parallel dimensions with this configuration's rank order."""
        return ParallelDims.of(self, self.layout)


class ModelSummary(_Out):
    """The model as the cost model counts it."""

    name: str
    params: int = Field(description="Total parameters (unique, embeddings once when tied).")
    active_params: int = Field(description="Parameters each token passes through; MFU counts their FLOPs.")
    num_experts: int | None = Field(None, description="Routed experts per MoE layer (None: a dense model).")
    top_k: int | None = Field(None, description="Experts each token is routed to.")
    moe_layers: int | None = Field(None, description="Layers with a mixture-of-experts MLP.")
    attention_kernel: str = Field(description="Attention kernel costed (the model's, else the engine's).")


class Prediction(_Out):
    feasible: bool
    reason: str = Field(description="Empty when feasible; else the stage and the shortfall in GiB.")
    engine: str = Field("meshplan", description="The engine the prediction is for (`--engine`), '(compiled)' "
                                                "with --compile.")
    model: ModelSummary | None = None
    config: ResolvedConfig
    predicted: Predicted
