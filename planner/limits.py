"""The range of every number meshplan accepts, on the command line and in files, checked before any work.

The bounds (README, "Input ranges") are far beyond any training job run today, and they bound every
computation: the search's work grows with the number of divisors of the sizes below these bounds (tens of
seconds at worst on 2 cores), and no float overflows to inf or underflows to a zero step time. A number
outside its range is one InputError (exit 2) naming the option or the file and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from planner.errors import InputError

KIB, MIB, GIB, TIB, PIB = 2 ** 10, 2 ** 20, 2 ** 30, 2 ** 40, 2 ** 50


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (a float must also be finite)."""

    lo: float
    hi: float

    def check(self, value, field: str):
        """`value` itself, or InputError naming `field`; None passes (an option left unset)."""
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"must be a finite number in {self} (got {value})", field=field)
        if not self.lo <= value <= self.hi:
            raise InputError(f"must be in {self} (got {_number(value)})", field=field)
        return value

    def __str__(self) -> str:
        return f"{_number(self.lo)}..{_number(self.hi)}"


def _number(x) -> str:
    """12,345 for integers (shortened when absurdly long), %g for floats."""
    if isinstance(x, float) and not x.is_integer():
        return f"{x:g}"
    if isinstance(x, float) and abs(x) >= 1e15:
        return f"{x:g}"
    text = f"{int(x):,}"
    return text if len(text) <= 40 else f"{text[:12]}...({len(str(abs(int(x))))} digits)"


# ----------------------------------------------------------------------------------------------
# Sizes shared by options and files
# ----------------------------------------------------------------------------------------------
MAX_NODES = 65_536
MAX_GPUS_PER_NODE = 1_024
MAX_GPUS = 262_144                      # nodes x GPUs per node
MAX_GLOBAL_BATCH = 1_048_576            # sequences per step
MAX_SEQ = 16_777_216                    # tokens per sequence
MAX_LAYERS = 10_000
FRACTION = Range(0.0, 1.0)

GPUS = Range(1, MAX_GPUS)
BATCH = Range(1, MAX_GLOBAL_BATCH)
SEQ = Range(1, MAX_SEQ)
LAYERS = Range(1, MAX_LAYERS)

TIMEOUT = Range(1e-6, 604_800.0)         # seconds: up to a week
OPTIONS: dict[str, Range] = {
    # meshplan estimate / plan
    "--nodes": Range(1, MAX_NODES), "--gpus-per-node": Range(1, MAX_GPUS_PER_NODE),
    "--global-batch": BATCH, "--seq": SEQ,
    "--tp": GPUS, "--pp": GPUS, "--dp": GPUS, "--ep": GPUS, "--moe-imbalance": Range(1.0, 64.0), "--max-tp": GPUS, "--max-pp": GPUS,
    "--mbs": BATCH, "--max-mbs": BATCH, "--vpp": LAYERS, "--zero": Range(0, 3), "--top": Range(1, 100),
    "--layers-per-stage": Range(0, MAX_LAYERS), "--memory-headroom": Range(0.0, 0.9),
    # meshplan run
    "--steps": Range(1, 10_000_000), "--seed": Range(0, 2 ** 32 - 1), "--lr": Range(0.0, 10.0),
    "--checkpoint-every": Range(0, 10_000_000), "--nnodes": Range(1, MAX_NODES),
    "--node-rank": Range(0, MAX_NODES - 1), "--nproc-per-node": Range(1, MAX_GPUS_PER_NODE),
    # meshplan profile model / cluster
    "--reps": Range(1, 10_000), "--warmup": Range(0, 10_000), "--timeout": TIMEOUT,
    "--collective-timeout": TIMEOUT, "--threads": Range(1, 1_024), "--nproc": Range(2, MAX_GPUS_PER_NODE),
    "--p2p-sizes": Range(1, TIB), "--collective-sizes": Range(1, TIB),
}

# fields of the input files, by spec class and field name
FIELDS: dict[str, dict[str, Range]] = {
    "ModelSpec": {"num_layers": LAYERS, "hidden_size": Range(1, 1_048_576), "num_heads": Range(1, 65_536),
                  "num_kv_heads": Range(1, 65_536), "ffn_hidden_size": Range(1, 4_194_304),
                  "vocab_size": Range(1, 16_777_216), "max_position_embeddings": SEQ,
                  "rope_theta": Range(1e-3, 1e12), "norm_eps": Range(1e-30, 1.0), "dropout": FRACTION,
                  "head_dim": Range(1, 65_536), "sliding_window": SEQ, "global_every": LAYERS,
                  "attention_chunk": SEQ},
    "MoESpec": {"num_experts": Range(1, 65_536), "top_k": Range(1, 65_536), "expert_ffn_size": Range(1, 4_194_304),
                "shared_experts": Range(0, 1_024), "shared_ffn_size": Range(1, 4_194_304),
                "first_dense_layers": Range(0, MAX_LAYERS), "every": LAYERS, "capacity_factor": Range(1e-3, 1e3)},
    "MLASpec": {"kv_lora_rank": Range(1, 1_048_576), "q_lora_rank": Range(1, 1_048_576),
                "qk_nope_head_dim": Range(1, 65_536), "qk_rope_head_dim": Range(1, 65_536),
                "v_head_dim": Range(1, 65_536)},
    "TrainingSpec": {"global_batch": BATCH, "seq_len": SEQ, "moe_imbalance": Range(1.0, 64.0)},
    "ParallelConfig": {"tp": GPUS, "pp": GPUS, "dp": GPUS, "ep": GPUS, "vpp": LAYERS, "mbs": BATCH,
                       "layers_per_stage": Range(0, MAX_LAYERS), "num_microbatches": BATCH,
                       "placement": Range(0, MAX_GPUS - 1)},
    "GPUSpec": {"memory_bytes": Range(MIB, PIB), "peak_flops": Range(1e6, 1e18), "hbm_bandwidth": Range(1e6, 1e15),
                "runtime_reserved_bytes": Range(0, PIB), "allocator_margin": FRACTION},
    "EfficiencyModel": {"gemm_max": FRACTION, "gemm_tile": Range(0, 1e6), "flash_attention": FRACTION,
                        "memory": FRACTION, "kernel_overhead_s": Range(0, 1.0)},
    "LinkSpec": {"bandwidth": Range(1e3, 1e15), "latency": Range(0, 10.0), "efficiency": FRACTION},
    "NodeGroup": {"count": Range(1, MAX_NODES), "gpus_per_node": Range(1, MAX_GPUS_PER_NODE),
                  "nics_per_node": Range(1, 1_024)},
    "ClusterSpec": {"nics_per_node": Range(1, 1_024), "overlap_slowdown": FRACTION},
    "GroupLink": {"bandwidth": Range(1e3, 1e15), "latency": Range(0, 10.0), "efficiency": FRACTION,
                  "oversubscription": Range(1.0, 1e6)},
    "Topology": {"nodes_per_leaf": Range(1, MAX_NODES), "oversubscription": Range(1.0, 1e6)},
    "LinkMatrix": {"world_size": GPUS, "bandwidth": Range(0, 1e15), "latency": Range(0, 10.0)},
    "CollectiveMeasurement": {"group_size": GPUS, "message_bytes": Range(1, PIB), "bus_bandwidth": Range(1e-3, 1e15),
                              "time_s": Range(1e-9, 1e6)},
    "BlockMeasurement": {"tp": GPUS, "mbs": BATCH, "forward_s": Range(1e-9, 1e6), "backward_s": Range(1e-9, 1e6),
                         "activation_bytes": Range(0, PIB), "allocator_activation_bytes": Range(-PIB, PIB)},
    "EndMeasurement": {"tp": GPUS, "mbs": BATCH, "forward_s": Range(1e-9, 1e6), "backward_s": Range(1e-9, 1e6),
                       "activation_bytes": Range(0, PIB)},
    "ModelProfile": {"seq_len": SEQ, "optimizer_s_per_param": Range(0, 1.0)},
}
ANY_INT = Range(-2 ** 53, 2 ** 53)       # any other number in a file: exact as a float
ANY_FLOAT = Range(-1e30, 1e30)


def check_option(value, field: str):
    """A command-line option against its documented range (OPTIONS)."""
    return OPTIONS[field].check(value, field)


def check_world(nodes: int, gpus_per_node: int, field: str) -> None:
    if nodes * gpus_per_node > MAX_GPUS:
        raise InputError(f"{nodes:,} nodes x {gpus_per_node:,} GPUs = {nodes * gpus_per_node:,} GPUs, more than "
                         f"the {MAX_GPUS:,} meshplan plans for", field=field)


def check_spec(spec: BaseModel, source: str) -> None:
    """Every number of a validated spec (and the specs inside it) within its range; InputError naming
    `source` and the field path (e.g. 'cluster.yaml: gpu_types.a100.memory_bytes')."""
    _walk(spec, source, "")
    for cluster in _find(spec, "ClusterSpec"):
        for group in cluster.groups_raw():
            check_world(group.count, group.gpus_per_node, f"{source}: nodes")
        if cluster.world_size > MAX_GPUS:
            raise InputError(f"the node groups hold {cluster.world_size:,} GPUs, more than the {MAX_GPUS:,} "
                             f"meshplan plans for", field=f"{source}: node_groups")


def _ranges_of(model: BaseModel) -> dict[str, Range]:
    out: dict[str, Range] = {}
    for cls in reversed(type(model).__mro__):
        out.update(FIELDS.get(cls.__name__, {}))
    return out


def _walk(value: Any, source: str, path: str, rng: Range | None = None) -> None:
    if isinstance(value, BaseModel):
        ranges = _ranges_of(value)
        for name in type(value).model_fields:
            _walk(getattr(value, name), source, f"{path}.{name}" if path else name, ranges.get(name))
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, source, f"{path}.{key}", rng)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, source, f"{path}[{i}]", rng)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        (rng or (ANY_FLOAT if isinstance(value, float) else ANY_INT)).check(value, f"{source}: {path}")


def _find(value: Any, class_name: str):
    """Every spec of class `class_name` inside `value`."""
    if isinstance(value, BaseModel):
        if type(value).__name__ == class_name:
            yield value
        for name in type(value).model_fields:
            yield from _find(getattr(value, name), class_name)
