"""The parameters `meshplan calibrate` may fit: physically meaningful ones only, each with physical bounds and
the structural condition under which measured runs can say anything about it.

A parameter is a dotted path (planner/calibrate.py): `gpu.` the cluster's GPU type, `engine.` the engine's data
on this cluster (kept in `engine_overrides`), anything else a path in the cluster spec. Spec-sheet numbers
(peak FLOP/s, HBM and link bandwidths) are never fitted: their efficiencies are. Whether the runs really
identify a parameter is then decided numerically (planner/calibration/fitting.py, `choose`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from planner.calibration.runs import MeasuredRun
from planner.engine import EngineSpec
from planner.specs import ClusterSpec

COLLECTIVE_OPS = {"all_reduce", "all_gather", "reduce_scatter"}

# Why a parameter cannot be identified by these runs on this cluster with this engine (None: it may be).
Condition = Callable[[Sequence[MeasuredRun], ClusterSpec, EngineSpec], "str | None"]


@dataclass(frozen=True)
class Candidate:
    """A parameter calibrate may fit, its physical bounds and when runs can identify it."""

    path: str
    what: str                                   # what it is, one line
    lower: float
    upper: float
    target: str = "step_time"                   # the measurement it predicts: step_time | peak_reserved
    condition: Condition | None = None          # why given runs cannot identify it (None: always may)
    relative_upper: bool = False                # times: the upper bound is at least 100x the current value

    def bounds(self, current: float) -> tuple[float, float]:
        """(lower, upper) around the current value (which they always include)."""
        upper = max(self.upper, 100.0 * current) if self.relative_upper else self.upper
        return self.lower, max(upper, current)


# ------------------------------------------------------------------ structural conditions
def _intra_collective(run: MeasuredRun) -> bool:
    """Whether the run may have a collective among GPUs of one node (TP, or DP with several GPUs per node; the
    numeric test of fitting.py decides the rest)."""
    return run.config.tp > 1 or (run.config.dp > 1 and run.gpus_per_node > 1)


def needs_intra_collective(runs, cluster, engine) -> str | None:
    if cluster.collectives and COLLECTIVE_OPS <= {c.op for c in cluster.collectives}:
        return "the cluster file's measured collective times (`collectives:`) replace the link model's collectives"
    if not any(_intra_collective(r) for r in runs):
        return "no run has a collective inside a node (every run has tp = 1 and dp = 1)"
    return None


def needs_intra_link(runs, cluster, engine) -> str | None:
    if not any(_intra_collective(r) or r.config.pp > 1 for r in runs):
        return "no run communicates inside a node (every run has tp = pp = dp = 1)"
    return None


def needs_nodes(runs, cluster, engine) -> str | None:
    if not any(r.nodes > 1 for r in runs):   # every GPU used: some group or stage boundary spans nodes
        return "every run is on one node: nothing crosses the inter-node links"
    return None


def needs_inter_collective(runs, cluster, engine) -> str | None:
    reason = needs_nodes(runs, cluster, engine)
    if reason is None and cluster.collectives and COLLECTIVE_OPS <= {c.op for c in cluster.collectives}:
        return "the cluster file's measured collective times (`collectives:`) replace the link model's collectives"
    return reason


def needs_overlap(runs, cluster, engine) -> str | None:
    if not any(r.config.dp > 1 for r in runs):
        return "no run overlaps data-parallel communication with compute (every run has dp = 1)"
    return None


def needs_collective(runs, cluster, engine) -> str | None:
    if not any(r.config.tp * r.config.pp * r.config.dp > 1 for r in runs):
        return "no run communicates (every run is on one GPU)"
    return None


def needs_flash(runs, cluster, engine) -> str | None:
    if all((r.model.attention_kernel or engine.kernels.attention) == "eager" for r in runs):
        return "every run uses eager attention"
    return None


def needs_compiled(runs, cluster, engine) -> str | None:
    if not any(r.compile for r in runs):
        return "no run is compiled (torch.compile)"
    return None


def needs_recompute(runs, cluster, engine) -> str | None:
    if all(r.config.recompute == "none" for r in runs):
        return "no run recomputes activations"
    return None


def needs_memory(runs, cluster, engine) -> str | None:
    if not any(r.peak_reserved_bytes for r in runs):
        return "no run has a measured peak_reserved_bytes"
    return None


def never_from_reserved(runs, cluster, engine) -> str | None:
    return ("it is device memory outside PyTorch's allocator (CUDA context, NCCL buffers), which the measured "
            "peak_reserved_bytes (torch.cuda.max_memory_reserved) does not include; it only sets the usable memory")


# ------------------------------------------------------------------ the candidates, in the order they are chosen
CANDIDATES: tuple[Candidate, ...] = (
    # what sets most of a step first: compute rates and the host's issue rate, then the links and the
    # overlap, then fixed costs, then the second-order shape terms
    Candidate("gpu.efficiency.gemm_max", "share of dense peak FLOP/s reached by large GEMMs", 0.05, 1.0),
    Candidate("engine.host.per_kernel_s", "host seconds to issue one forward kernel", 0.0, 1e-3,
              relative_upper=True),
    Candidate("gpu.efficiency.memory", "share of HBM bandwidth reached by elementwise kernels", 0.05, 1.0),
    Candidate("gpu.efficiency.flash_attention", "share of dense peak reached by fused attention", 0.05, 1.0,
              condition=needs_flash),
    Candidate("intra_node.efficiency", "share of the intra-node link bandwidth collectives reach", 0.05, 1.0,
              condition=needs_intra_collective),
    Candidate("inter_node.efficiency", "share of the NIC bandwidth collectives reach", 0.05, 1.0,
              condition=needs_inter_collective),
    Candidate("overlap_slowdown", "share of overlapped communication time still lost to compute", 0.0, 1.0,
              condition=needs_overlap),
    Candidate("intra_node.latency", "seconds per message inside a node", 0.0, 1e-3, condition=needs_intra_link,
              relative_upper=True),
    Candidate("inter_node.latency", "seconds per message between nodes", 0.0, 1e-3, condition=needs_nodes,
              relative_upper=True),
    Candidate("engine.host.per_collective_s", "host seconds to issue one collective or transfer", 0.0, 1e-3,
              condition=needs_collective, relative_upper=True),
    Candidate("engine.host.per_microbatch_s", "host seconds per micro-batch and stage", 0.0, 0.1,
              relative_upper=True),
    Candidate("engine.host.per_step_s", "host seconds per optimizer step", 0.0, 1.0, relative_upper=True),
    Candidate("engine.host.per_backward_kernel_s", "host seconds per backward kernel", 0.0, 1e-3,
              relative_upper=True),
    Candidate("engine.host.recompute_kernel_factor", "host cost per replayed kernel of a checkpointed block, "
              "as a multiple of a forward kernel's", 0.3, 5.0, condition=needs_recompute),
    Candidate("engine.host.compiled_kernel_factor", "host cost per kernel under torch.compile, share of eager's",
              0.05, 1.0, condition=needs_compiled),
    Candidate("gpu.efficiency.gemm_tile", "GEMM dimension (elements) at which a GEMM runs at half its best rate",
              0.0, 2048.0),
    Candidate("gpu.efficiency.gemm_backward", "backward GEMMs' rate as a share of the forward's", 0.3, 1.0),
    Candidate("gpu.efficiency.attention_tile", "fused attention's thread blocks at which it runs at half rate",
              0.0, 20000.0, condition=needs_flash),
    Candidate("gpu.efficiency.attention_head_dim", "head dimension at which fused attention runs at half rate",
              0.0, 512.0, condition=needs_flash),
    Candidate("gpu.efficiency.kernel_overhead_s", "shortest time a kernel takes on the device, seconds",
              0.0, 1e-4, relative_upper=True),
    # reserved memory
    Candidate("gpu.allocator_margin", "reserved-but-unallocated bytes, share of the allocated peak", 0.0, 1.0,
              target="peak_reserved", condition=needs_memory),
    Candidate("gpu.runtime_reserved_bytes", "device bytes outside the framework's allocator", 0.0, 0.0,
              target="peak_reserved", condition=never_from_reserved),
)

BY_PATH = {c.path: c for c in CANDIDATES}
