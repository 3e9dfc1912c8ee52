"""`estimate --from` and `plan --compare` with an existing launch: specs and a configuration from the launch,
the cluster (and whatever the launch does not say) from the command line, and every disagreement an error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import InputError
from planner.export import TARGETS, launch_source, with_model
from planner.export.common import Launch, read_launch_counts, shape_difference
from planner.export.deepspeed import looks_like

# estimate options a launch sets: passing one with --from is an error (the launch decides)
PARALLEL_OPTIONS = ("tp", "pp", "dp", "ep", "mbs", "vpp", "zero", "recompute", "sp", "schedule", "layers_per_stage",
                    "overlap_grad_reduce")


@dataclass
class LaunchInputs:
    model: Any
    cluster: Any
    training: Any
    launch: Launch


def read(path: Path, world_size: int) -> tuple[Launch, tuple[int | None, int | None]]:
    """The launch at `path` for `world_size` GPUs, and the (nodes, GPUs per node) its launch.sh names."""
    target, data, script = launch_source(path)
    counts = read_launch_counts(script) if script is not None else (None, None)
    return TARGETS[target].read(data, str(path), world_size), counts


def cluster_for(path: Path, cluster: str, nodes: int | None, gpus_per_node: int | None):
    """The cluster resized to the node and GPU counts of the launch's launch.sh, when it has one."""
    from planner.loaders import load_cluster
    _, _, script = launch_source(path)
    counts = read_launch_counts(script) if script is not None else (None, None)
    for given, found, flag in ((nodes, counts[0], "--nodes"), (gpus_per_node, counts[1], "--gpus-per-node")):
        if given is not None and found is not None and given != found:
            raise InputError(f"{given} but {script} runs {found}", field=flag)
    return load_cluster(cluster, nodes or counts[0], gpus_per_node or counts[1])


def estimate_inputs(path: Path, cluster_spec, model_arg: str | None, explicit: dict[str, Any],
                    seq: int, optimizer: str) -> LaunchInputs:
    """Specs for `estimate --from`: `explicit` holds the options typed on the command line."""
    from planner.loaders import load_model, parse_spec
    from planner.specs import TrainingSpec
    for name in PARALLEL_OPTIONS:
        if name in explicit:
            raise InputError("the launch sets it; drop it with --from", field="--" + name.replace("_", "-"))
    launch, _ = read(path, cluster_spec.world_size)
    model = load_model(model_arg) if model_arg is not None else None
    if launch.model is None and model is None:
        raise InputError(f"{path} does not carry the model's shape ({launch.target}): pass --model", field="--model")
    if model is not None and launch.model is not None:
        diff = shape_difference(model, launch.model)
        if diff:
            raise InputError(f"the launch's model differs: {diff} (--model vs {path})", field="--model")
    launch = with_model(launch, model or launch.model)
    if launch.seq_len is None and "seq" not in explicit:
        raise InputError(f"{path} does not say the sequence length ({launch.target}): pass --seq", field="--seq")
    checks = (("seq", launch.seq_len), ("global_batch", launch.global_batch), ("precision", launch.precision),
              ("optimizer", launch.optimizer))
    for name, value in checks:
        if name in explicit and value is not None and explicit[name] != value:
            raise InputError(f"{explicit[name]} but the launch has {value} ({path})",
                             field="--" + name.replace("_", "-"))
    training = parse_spec(TrainingSpec, dict(
        global_batch=launch.global_batch, seq_len=launch.seq_len or seq, precision=launch.precision,
        optimizer=launch.optimizer or optimizer, overlap_grad_reduce=launch.overlap_grad_reduce,
        moe_imbalance=explicit.get("moe_imbalance")), str(path))
    return LaunchInputs(launch.model, cluster_spec, training, launch)


def compare_launch(path: Path, model, cluster, training) -> Launch:
    """The launch at `path` as a configuration to rank against a search over (model, cluster, training)."""
    launch, counts = read(path, cluster.world_size)
    if counts[0] is not None and counts[0] * (counts[1] or cluster.gpus_per_node) != cluster.world_size:
        raise InputError(f"{path} runs {counts[0]} x {counts[1]} GPUs but the search has {cluster.world_size}",
                         field="--compare")
    if launch.model is not None:
        diff = shape_difference(model, launch.model)
        if diff:
            raise InputError(f"the launch trains another model: {diff} (--model vs {path})", field="--compare")
    launch = with_model(launch, model)
    for what, ours, theirs in (("global batch", training.global_batch, launch.global_batch),
                               ("sequence length", training.seq_len, launch.seq_len),
                               ("precision", training.precision, launch.precision)):
        if theirs is not None and ours != theirs:
            raise InputError(f"the launch's {what} is {theirs}, the search's {ours} ({path})", field="--compare")
    return launch


def is_launch(text: str) -> bool:
    """Whether --compare names an existing launch: a directory, a JSON argument list or DeepSpeed config, or a
    text file of arguments (plan and estimate files are JSON / YAML mappings)."""
    path = Path(text)
    if path.is_dir():
        return True
    if not path.is_file() or path.suffix in (".yaml", ".yml"):
        return False
    if path.suffix != ".json":
        return True
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False        # parse_compare reports it
    return isinstance(data, list) or looks_like(data)


def compare_candidate(path: Path, model, cluster, training):
    """A launch as the configuration `plan --compare` ranks."""
    from planner.search.space import Candidate
    launch = compare_launch(path, model, cluster, training)
    cfg = launch.config
    return cfg, Candidate(cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule,
                          launch.order, tuple(cfg.layers_per_stage), cfg.ep)
