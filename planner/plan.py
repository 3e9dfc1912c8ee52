"""The plan file: everything `meshplan run` and the exporters need, versioned.

A plan carries the same `feasible`, `reason`, `config` and `predicted` objects as `meshplan estimate --json`,
plus the specs it was made for and the rank layout (which global rank holds which (pp, dp, tp) coordinate,
on which node and local GPU).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from planner.engine import EngineSpec
from planner.layout import Layout
from planner.prediction import ModelSummary, Predicted, Prediction, ResolvedConfig
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

SCHEMA_VERSION = 2


class RankEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    rank: int
    pp: int
    dp: int
    tp: int
    node: int
    local_gpu: int
    node_group: str | None = Field(None, description="The node group of the rank's GPU (cluster node_groups).")
    gpu_type: str | None = Field(None, description="The rank's GPU type (a key of the cluster's gpu_types).")


class NodeGroupsReport(BaseModel):
    """How a plan uses a cluster's node groups (plans of clusters with node_groups only)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    stage_groups: list[str] = Field(description="The node group of each pipeline stage.")
    assignment: str = Field(description="How stages were assigned to groups: ilp (proven optimal), local search, "
                                        "contiguous.")
    naive_step_time_s: float | None = Field(None, description="The same degrees in naive rank order, layers even.")
    naive_feasible: bool | None = None
    single_group_step_time_s: dict[str, float | None] = Field(
        default_factory=dict, description="The best plan's step on each node group alone (None: nothing fits).")
    explanation: list[str] = Field(default_factory=list)


class SearchStats(BaseModel):
    """How the search got there (absent for a plan written by `estimate`)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)
    seconds: float
    candidates: int = Field(description="Configurations enumerated.")
    evaluated: int = Field(description="Configurations fully costed.")
    rejected: dict[str, int] = Field(description="Rejections by reason.")
    naive_step_time_s: float | None = Field(
        None, description="The best configuration's step with rank r on device r, before placement on measured "
                          "links (equal to the winner's when links are not measured).")
    expert_parallelism: str | None = Field(
        None, description="Mixture-of-experts models: why the winner's expert-parallel degree beats the others in "
                          "the same configuration (all-to-all on which links, DP communication, memory).")


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    schema_version: int = SCHEMA_VERSION
    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    engine: EngineSpec = Field(description="The engine the prediction is for, in full (as `--engine` resolved it, "
                                           "with the cluster's overrides).")
    model_summary: ModelSummary | None = Field(None, description="Total and active parameters.")
    feasible: bool
    reason: str
    config: ResolvedConfig
    predicted: Predicted
    rank_layout: list[RankEntry]
    alternatives: list[Prediction] = Field(default_factory=list, description="Runners-up, best first.")
    search: SearchStats | None = None
    node_groups: NodeGroupsReport | None = None

    @property
    def world_size(self) -> int:
        return len(self.rank_layout)


def make_plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, best: Prediction,
              alternatives: list[Prediction] | None = None, search: SearchStats | None = None,
              engine: EngineSpec | None = None) -> Plan:
    """The plan file of `best` (default engine: meshplan). The model's attention kernel is recorded resolved
    (the model's, else the engine's), so that what runs is what was costed."""
    from planner.engine import load_engine
    engine = engine or load_engine()
    if model.attention_kernel is None:
        model = model.model_copy(update={"attention_kernel": engine.kernels.attention})
    cfg = best.config
    layout = Layout(cfg.dims, cluster.gpus_per_node, tuple(cfg.placement) if cfg.placement is not None else None)
    return Plan(model=model, cluster=cluster, training=training, engine=engine,
                model_summary=best.model, feasible=best.feasible, reason=best.reason,
                config=cfg, predicted=best.predicted,
                rank_layout=[RankEntry(**row, node_group=cluster.nodes.name, gpu_type=cluster.nodes.gpu_type)
                             for row in layout.entries()],
                alternatives=alternatives or [], search=search)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; InputError (exit 2) on anything wrong."""
    from planner.loaders import load_versioned
    return load_versioned(path, "plan", Plan, SCHEMA_VERSION)
