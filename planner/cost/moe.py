"""Mixture-of-experts layers under expert parallelism: kernels, all-to-all traffic, kept activations and the
groups the experts' communication runs on.

As Megatron-Core (`--expert-model-parallel-size`, its all-to-all token dispatcher) and torchtitan
(`expert_parallel_degree`) run them: the routed experts of every MoE layer are sharded over `ep` ranks inside
the data-parallel group (consecutive data-parallel ranks), each expert's MLP over the tensor-parallel group
(expert tensor parallelism = tp, Megatron's default); attention, router and shared experts stay as in a dense
layer. Per MoE layer and micro-batch a rank

  * routes its tokens (router GEMM h x E, softmax and top-k), permutes the k copies of each token by expert,
  * dispatches them over the EP group (all-to-all of tokens*k*h elements, (ep-1)/ep of it leaving the rank),
    gathers them over the TP group (sequence parallelism, which Megatron-Core requires for MoE with tp > 1),
  * runs its E/ep local experts as one grouped GEMM per projection on the routed rows it received,
  * reduce-scatters over TP, combines back over EP (the same all-to-all) and un-permutes with the router weights;

the backward runs the same two all-to-alls (DESIGN.md Sec. 10). Routing is uneven: the busiest EP rank computes
and receives `imbalance` times the mean number of routed rows and sets the pace of the all-to-alls and of the
expert GEMMs (`imbalance()`: the busiest expert's excess, spread over the experts a rank holds; a capacity
factor caps it: tokens beyond capacity are dropped). Expert gradients are reduced over
the expert-data-parallel group (dp/ep ranks: the ranks holding the same experts); model.py costs them with the
same data-parallel machinery as the dense parameters. The EP and expert-DP groups are planner/parallel_dims.py's
'ep' and 'edp' dimensions, the ones the runtime's device mesh has.
"""

from __future__ import annotations

import math

from planner.cost.dp_comm import DPComm
from planner.cost.kernels import FP32, Collective, Dtypes, KernelOptions, Pass, _activation
from planner.specs import ModelSpec, TrainingSpec

# The busiest expert's routed tokens over the mean. Switch Transformer (Fedus et al. 2022, JMLR, Sec. 2.2 and
# Table 1) trains with an expert capacity of 1.25x the mean, the provision its load-balancing loss needs for few
# tokens to overflow; GShard (Lepikhin et al. 2021, Sec. 2.2) and Megatron-Core's `--moe-expert-capacity-factor`
# examples use the same range. Override with `--moe-imbalance` (TrainingSpec.moe_imbalance) from measured
# routing statistics.
DEFAULT_IMBALANCE = 1.25
ROUTING_INDEX = 8          # int64 expert index per routed copy, kept for the un-permute


def imbalance(m: ModelSpec, training: TrainingSpec, ep: int) -> float:
    """Routed rows of the busiest EP rank over the mean. A rank holds n = E/ep experts; the spread of the mean
    load of n experts drawn from E shrinks by the finite-population factor sqrt((E - n) / (n (E - 1))) =
    sqrt((ep - 1) / (E - 1)) against one expert's, so the busiest rank's excess is the busiest expert's
    (the factor) times that: 1 without expert parallelism (one rank computes every expert's rows), the full
    factor with one expert per rank. A capacity factor caps it (tokens beyond capacity are dropped)."""
    if m.moe is None or ep == 1:
        return 1.0
    factor = training.moe_imbalance or DEFAULT_IMBALANCE
    experts = m.moe.num_experts
    rank = 1.0 + (factor - 1.0) * math.sqrt((ep - 1) / (experts - 1))
    return min(rank, m.moe.capacity_factor) if m.moe.capacity_factor else rank


def routed_rows(m: ModelSpec, tokens: float, factor: float) -> float:
    """Routed token copies one rank's experts compute for `tokens` tokens of its EP group's micro-batch."""
    return tokens * m.moe.top_k * factor


def moe_mlp_work(fwd: Pass, bwd: Pass, m: ModelSpec, tokens: int, tp: int, sp: bool, ep: int, factor: float,
                 dt: Dtypes, opts: KernelOptions) -> None:
    """Append one MoE MLP's kernels (router, permutation, grouped expert GEMMs, shared experts, combination) and
    its collectives to `fwd`, and the backward kernels of its elementwise pieces to `bwd` (its GEMMs' backward
    is derived from `fwd` by kernels.block_work)."""
    e, h, moe = dt.act, m.hidden_size, m.moe
    local = tokens / tp if sp else tokens               # the sequence shard of this TP rank
    rows = routed_rows(m, tokens, factor)               # gathered over TP: every TP rank holds all routed rows
    f_e = moe.expert_ffn_size / tp
    gated = m.mlp != "gelu"
    experts = moe.num_experts // ep
    fwd.gemm(local, moe.num_experts, h, e)                                           # router
    fwd.chain(local * moe.num_experts * (e + FP32), local * moe.num_experts * 2 * FP32)   # scores, top-k
    bwd.chain(local * moe.num_experts * 2 * FP32)
    fwd.mem(2 * local * moe.top_k * h * e)                                           # permute by expert
    bwd.mem(2 * local * moe.top_k * h * e)
    dispatch = local * moe.top_k * factor * h * e
    if ep > 1:
        fwd.collectives.append(Collective("all_to_all", dispatch, "ep"))
    if tp > 1:
        fwd.collectives.append(Collective("all_gather", rows * h * e))
    per_expert = rows / experts
    fwd.gemm(per_expert, f_e * (2 if gated else 1), h, e, batch=experts)            # grouped gate / up
    _activation(fwd, bwd, m, rows * f_e * (2 if gated else 1), rows * f_e, e, "activation" in opts.fused)
    fwd.gemm(per_expert, h, f_e, e, batch=experts)                                   # grouped down
    if tp > 1:
        fwd.collectives.append(Collective("reduce_scatter", rows * h * e))
    if ep > 1:
        fwd.collectives.append(Collective("all_to_all", dispatch, "ep"))
    fwd.mem(local * moe.top_k * h * e * 2 + local * h * e)                           # un-permute, weigh, sum
    bwd.mem(local * moe.top_k * h * e * 3)
    if moe.shared_width:
        f_s = moe.shared_width / tp
        if tp > 1:
            fwd.collectives.append(Collective("all_gather", tokens * h * e))
        fwd.gemm(tokens, f_s * (2 if gated else 1), h, e)
        _activation(fwd, bwd, m, tokens * f_s * (2 if gated else 1), tokens * f_s, e, "activation" in opts.fused)
        fwd.gemm(tokens, h, f_s, e)
        if moe.shared_expert_gate:
            fwd.gemm(tokens, 1, h, e)
        if tp > 1:
            fwd.collectives.append(Collective("reduce_scatter", tokens * h * e))
        fwd.mem(3 * local * h * e)                                                   # add to the routed output


def moe_activation_bytes(m: ModelSpec, tokens: int, tp: int, sp: bool, factor: float, dt: Dtypes) -> float:
    """Bytes one MoE MLP keeps for its backward on one TP rank (its input, the norm output, is counted with the
    block's linear inputs): router scores (fp32), the routed copies' expert indices and weights, the permuted
    copies (the grouped GEMM's input), their gate, up and gated product (or GELU input and output), the experts'
    outputs (the combination's backward reads them) and the shared experts' gate, up and product."""
    e, h, moe = dt.act, m.hidden_size, m.moe
    local = tokens / tp if sp else tokens
    rows = routed_rows(m, tokens, factor)
    gated = m.mlp != "gelu"
    router = local * moe.num_experts * FP32 + local * moe.top_k * (FP32 + ROUTING_INDEX)
    experts = rows * (e * h + e * moe.expert_ffn_size / tp * (3 if gated else 2) + e * h)
    shared = tokens * e * moe.shared_width / tp * (3 if gated else 2)
    return router + experts + shared


def add_comm(a: DPComm, b: DPComm) -> DPComm:
    """The dense and the expert parameters' data-parallel communication of one stage together (both run on the
    same links in the same windows)."""
    return DPComm(**{k: getattr(a, k) + getattr(b, k) for k in DPComm.__dataclass_fields__})
