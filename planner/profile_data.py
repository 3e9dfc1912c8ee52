"""The model-profile file `meshplan profile model` writes and `--profile` reads (no torch needed to read it).

Times are seconds for one micro-batch on one device; bytes are what the pass keeps for backward.
A block is measured at the local shapes of one TP shard (heads/tp, kv_heads/tp, ffn/tp), without the TP
collectives, which the cost model adds from the cluster's links; a mixture-of-experts model has measurements of
its dense and its MoE blocks (the MoE block with every expert on the device: the all-to-alls and the load
imbalance of expert parallelism are the cost model's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from planner.specs import ModelSpec, Optimizer, Precision, Recompute

PROFILE_SCHEMA_VERSION = 1


class _P(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class DeviceInfo(_P):
    type: Literal["cuda", "cpu"]
    name: str
    torch_version: str
    threads: int | None = Field(None, description="CPU threads torch used (CPU profiles).")


class BlockMeasurement(_P):
    """One transformer block (of one kind: dense MLP or mixture-of-experts MLP) at one TP shard size, micro-batch
    size and recompute mode."""

    layer: Literal["dense", "moe"] = Field(
        "dense", description="The block's MLP: dense, or mixture of experts (every expert on this device, ep 1; "
                             "tokens routed, expert widths / tp, as one TP shard computes them).")
    tp: PositiveInt
    mbs: PositiveInt
    recompute: Recompute
    forward_s: PositiveFloat = Field(description="Forward seconds (median).")
    backward_s: PositiveFloat = Field(description="Backward seconds including any recomputation (median).")
    activation_bytes: int = Field(ge=0, description="Bytes saved for backward (saved-tensor hooks, by storage).")
    allocator_activation_bytes: int | None = Field(
        None, description="Allocator delta across the forward (CUDA only): a cross-check of activation_bytes.")


class EndMeasurement(_P):
    """The embedding (first stage) or the LM head with its loss (last stage)."""

    part: Literal["embedding", "head"]
    tp: PositiveInt
    mbs: PositiveInt
    forward_s: PositiveFloat
    backward_s: PositiveFloat
    activation_bytes: int = Field(ge=0)


class ModelProfile(_P):
    schema_version: int = PROFILE_SCHEMA_VERSION
    kind: Literal["model_profile"] = "model_profile"
    model: ModelSpec
    precision: Precision
    run_precision: Precision | None = Field(
        None, description="Precision the pieces actually ran in, when it differs from `precision` (the runtime "
                          "computes in fp32 on CPU whatever the plan asks).")
    seq_len: PositiveInt
    device: DeviceInfo
    blocks: list[BlockMeasurement]
    ends: list[EndMeasurement] = Field(default_factory=list)
    optimizer_s_per_param: float | None = Field(None, ge=0, description="Optimizer step seconds per parameter.")
    optimizer: Optimizer | None = Field(None, description="The optimizer `optimizer_s_per_param` was measured with.")
    complete: bool = Field(True, description="False while a run is still filling it in (resumable).")


def load_profile(path: str | Path) -> ModelProfile:
    """Read and validate a model profile; InputError (exit 2) on anything wrong."""
    from planner.loaders import load_versioned
    return load_versioned(path, "--profile", ModelProfile, PROFILE_SCHEMA_VERSION, kind="model_profile",
                          what="model profile (written by `meshplan profile model`)")
