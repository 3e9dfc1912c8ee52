"""The model-profile file `meshplan profile model` writes and `--profile` reads (no torch needed to read it).

Times are seconds for one micro-batch on one device; bytes are what the pass keeps for backward.
A block is measured at the local shapes of one TP shard (heads/tp, kv_heads/tp, ffn/tp), without the TP
collectives, which the cost model adds from the cluster's links.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from planner.errors import InputError, first_pydantic_error
from planner.specs import ModelSpec, Optimizer, Precision, Recompute

PROFILE_SCHEMA_VERSION = 1


class _P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceInfo(_P):
    type: Literal["cuda", "cpu"]
    name: str
    torch_version: str
    threads: int | None = Field(None, description="CPU threads torch used (CPU profiles).")


class BlockMeasurement(_P):
    """One transformer block at one TP shard size, micro-batch size and recompute mode."""

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
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such file '{p}'", field="--profile")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"'{p}' is not valid JSON (line {exc.lineno})", field="--profile") from None
    if not isinstance(data, dict) or data.get("kind") != "model_profile":
        raise InputError(f"'{p}' is not a model profile (written by `meshplan profile model`)", field="--profile")
    if data.get("schema_version") != PROFILE_SCHEMA_VERSION:
        raise InputError(f"'{p}' has schema_version {data.get('schema_version')!r}; this meshplan reads "
                         f"{PROFILE_SCHEMA_VERSION}", field="--profile")
    try:
        return ModelProfile.model_validate(data)
    except ValidationError as exc:
        raise first_pydantic_error(exc, str(p)) from None
