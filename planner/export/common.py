"""What every export target shares: the adjusted configuration a target can express, the launch a reader
recovers, the plan's engine, and the torchrun / Slurm scripts.

A target module (megatron, deepspeed, torchtitan) has three pure functions:
  nearest(plan) -> Adjusted      the closest configuration the target expresses, with what changed
                                 (InputError when nothing close exists);
  files(plan, adjusted) -> dict  file name -> text, besides launch.sh and slurm.sbatch;
  read(source, world_size) -> Launch   an existing launch of that engine, as meshplan specs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import InputError
from planner.layout import DEFAULT_ORDER
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec

ENGINES = ("meshplan", "torchtitan", "megatron", "deepspeed")


def plan_engine(plan) -> str:
    """The engine a plan was costed for."""
    return plan.engine.name


def overlaps_grad_reduce(plan) -> bool:
    """Whether the plan's data-parallel gradient reduction runs under the backward: the training's override,
    else its engine's choice."""
    if plan.training.overlap_grad_reduce is not None:
        return plan.training.overlap_grad_reduce
    return plan.engine.overlap.grad_reduce == "during_backward"


def engine_compiles(plan) -> bool:
    """Whether the plan's engine runs torch.compile over its blocks."""
    return plan.engine.compile


@dataclass(frozen=True)
class Adjusted:
    """The configuration a target writes: the plan's, or the nearest one the target can express."""

    config: ParallelConfig                       # layers_per_stage always explicit
    training: TrainingSpec
    order: tuple[str, str, str] = DEFAULT_ORDER
    changes: tuple[str, ...] = ()                # one line per thing the target could not express


@dataclass
class Launch:
    """An existing launch (or an export read back), as meshplan sees it."""

    target: str
    source: str
    model: ModelSpec | None            # None when the launch does not carry the model's shape (DeepSpeed)
    config: ParallelConfig
    global_batch: int
    seq_len: int | None                # None when the launch does not say (DeepSpeed)
    precision: str
    optimizer: str | None              # None: the launch does not say
    overlap_grad_reduce: bool
    order: tuple[str, str, str] = DEFAULT_ORDER
    notes: list[str] = field(default_factory=list)   # how something was read that meshplan models approximately
    routing: tuple[int, str] | None = None   # (top-k, router) a launch without the model states (DeepSpeed AutoEP)

    @property
    def engine(self) -> str:
        """The engine that runs this launch (the target's)."""
        return self.target


def resolved_config(plan) -> ParallelConfig:
    """The plan's configuration as a ParallelConfig with explicit layers per chunk."""
    fields = {k: getattr(plan.config, k) for k in ParallelConfig.model_fields}
    return ParallelConfig(**fields)


def change_config(cfg: ParallelConfig, **update) -> ParallelConfig:
    return ParallelConfig(**{**cfg.model_dump(), **update})


# ---------------------------------------------------------------------------------------------- model shapes
def model_shape(m: ModelSpec) -> dict:
    """The fields that decide a model's cost, as two specs of the same model agree on them: the dense MLP width
    only where some layer is dense (an all-MoE model's ffn_hidden_size is unused), the head width resolved."""
    all_moe = m.moe is not None and m.num_moe_layers == m.num_layers
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
            "kv_heads": m.kv_heads, "head_dim": m.dim_per_head, "ffn_size": None if all_moe else m.ffn_size,
            "vocab_size": m.vocab_size, "tied_embeddings": m.tied_embeddings, "norm": m.norm, "mlp": m.mlp,
            "qk_norm": m.qk_norm, "bias": m.bias, "has_qkv_bias": m.has_qkv_bias,
            "position_embedding": m.position_embedding, "dropout": m.dropout, "attention": m.attention_kernel,
            "moe": None if m.moe is None else _moe_shape(m),
            "windows": (m.sliding_window, m.global_every, m.attention_chunk), "sandwich_norm": m.sandwich_norm,
            "mla": m.mla}


def _moe_shape(m: ModelSpec) -> tuple:
    """What a MoE spec costs: experts, top-k, widths (shared experts by their total width), the router,
    capacity, and which layers route (not how first_dense_layers / every spell it)."""
    e = m.moe
    layers = "".join("1" if e.is_moe_layer(i) else "0" for i in range(m.num_layers))
    return (e.num_experts, e.top_k, e.expert_ffn_size, e.shared_width, e.shared_expert_gate and e.shared_width > 0,
            e.router, e.capacity_factor, layers)


def shape_difference(a: ModelSpec, b: ModelSpec) -> str | None:
    """The first cost-deciding field on which two models differ ('moe ...'), or None; an attention kernel left
    to the engine (None) matches either kernel."""
    sa, sb = model_shape(a), model_shape(b)
    for name in sa:
        if name == "attention" and None in (sa[name], sb[name]):
            continue
        if sa[name] != sb[name]:
            return f"{name} {sa[name]} vs {sb[name]}"
    return None


def refuse_unwritten(m: ModelSpec, target: str, expressible: tuple[str, ...]) -> None:
    """InputError naming the first field beyond a dense GPT-2 / Llama block that `target` does not write
    (those in `expressible` it does: 'moe', 'head_dim', 'qk_norm', 'mla')."""
    from planner.validate import beyond_dense_blocks
    field = beyond_dense_blocks(m)
    while field in expressible:
        plain = {"moe": {"moe": None}, "head_dim": {"head_dim": None}, "qk_norm": {"qk_norm": "none"},
                 "mla": {"mla": None}}[field]
        m = m.model_copy(update=plain)
        field = beyond_dense_blocks(m)
    if field:
        raise InputError(f"the {target} export does not write {field} ({m.name}); it writes dense GPT-2 / Llama "
                         f"blocks{' and ' + ', '.join(expressible) if expressible else ''}", field=f"--to {target}")


# ---------------------------------------------------------------------------------------------- argument lists
def parse_arg_list(items: list[str]) -> dict[str, list[str]]:
    """Command-line items -> {"--flag": [values...]} (a flag given twice keeps its last values); `--k=v` splits."""
    out: dict[str, list[str]] = {}
    key = None
    for item in items:
        if item.startswith("--") and not _is_number(item):
            name, eq, value = item.partition("=")
            key = name
            out[key] = [value] if eq else []
        elif _SUBCOMMAND.fullmatch(item):
            out[item] = []          # a tyro subcommand (torchtitan's activation-checkpoint:MODE)
            key = None
        elif key is not None:
            out[key].append(item)
        else:
            raise InputError(f"'{item}' is not an option (options start with --)", field="--from")
    return out


_SUBCOMMAND = re.compile(r"[a-z][a-z0-9_-]*:[a-z0-9_-]+")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_arg_file(path: Path) -> list[str]:
    """A JSON list of arguments, or a text file holding them as one shell line."""
    import json
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"'{path}' is not valid JSON (line {exc.lineno})", field="--from") from None
        except RecursionError:
            raise InputError(f"'{path}' is nested too deeply", field="--from") from None
        if not isinstance(data, list) or not all(isinstance(x, (str, int, float)) for x in data):
            raise InputError(f"'{path}' must hold a JSON list of command-line arguments", field="--from")
        return [str(x) for x in data]
    try:
        return shlex.split(text, comments=True)
    except ValueError as exc:
        raise InputError(f"'{path}' is not a shell line: {exc}", field="--from") from None


def shell_line(items: list[str]) -> str:
    return " ".join(shlex.quote(x) for x in items) + "\n"


def take_int(args: dict[str, list[str]], flag: str, default: int | None, source: str) -> int | None:
    if flag not in args:
        return default
    values = args[flag]
    if len(values) != 1 or not re.fullmatch(r"-?\d+", values[0]):
        raise InputError(f"{flag} needs one whole number (got {' '.join(values) or 'nothing'})", field=source)
    return int(values[0])


def take_float(args: dict[str, list[str]], flag: str, default: float, source: str) -> float:
    if flag not in args:
        return default
    values = args[flag]
    if len(values) != 1 or not _is_number(values[0]):
        raise InputError(f"{flag} needs one number (got {' '.join(values) or 'nothing'})", field=source)
    return float(values[0])


def take_str(args: dict[str, list[str]], flag: str, default: str | None, source: str) -> str | None:
    if flag not in args:
        return default
    values = args[flag]
    if len(values) != 1:
        raise InputError(f"{flag} needs one value (got {' '.join(values) or 'nothing'})", field=source)
    return values[0]


# ---------------------------------------------------------------------------------------------- launch scripts
def launch_script(plan, title: str, command: list[str], env: dict[str, str] | None = None,
                  args_file: str | None = None) -> str:
    """launch.sh: the torchrun line each node runs (NODE_RANK 0..nodes-1, MASTER_ADDR = node 0).

    `command` follows torchrun's options; with `args_file`, that file's shell line is appended to it."""
    nodes, gpn = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    lines = [
        "#!/usr/bin/env bash",
        f"# meshplan export for {title}: {plan.model.name} on {nodes} x {gpn} {plan.cluster.gpu.name}, "
        f"{plan.config.short()}",
        f"# On node i (0..{nodes - 1}): NODE_RANK=i MASTER_ADDR=<node 0's address> bash launch.sh",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"NNODES={nodes}",
        f"NPROC_PER_NODE={gpn}",
        'NODE_RANK="${NODE_RANK:-0}"',
        'MASTER_ADDR="${MASTER_ADDR:-localhost}"',
        'MASTER_PORT="${MASTER_PORT:-29500}"',
    ]
    lines += [f"export {k}={v}" for k, v in (env or {}).items()]
    if args_file:
        lines.append(f'eval "ARGS=($(cat "$HERE/{args_file}"))"')
    torchrun = ["torchrun", "--nnodes", '"$NNODES"', "--nproc-per-node", '"$NPROC_PER_NODE"',
                "--node-rank", '"$NODE_RANK"', "--master-addr", '"$MASTER_ADDR"', "--master-port", '"$MASTER_PORT"']
    parts = torchrun + command + (['"${ARGS[@]}"'] if args_file else [])
    lines.append("exec " + " \\\n    ".join(_group(parts)))
    return "\n".join(lines) + "\n"


def _group(parts: list[str]) -> list[str]:
    """Pair each option with its value for a readable multi-line command."""
    out, i = [], 0
    while i < len(parts):
        if parts[i].startswith("--") and i + 1 < len(parts) and not parts[i + 1].startswith("--"):
            out.append(f"{parts[i]} {parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def slurm_script(plan, title: str) -> str:
    """slurm.sbatch: one task per node, each running launch.sh with its node rank."""
    nodes, gpn = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", plan.model.name)
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=meshplan-{name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpn}",
        "#SBATCH --exclusive",
        f"# meshplan export for {title}; submit from the export directory: sbatch slurm.sbatch",
        "set -euo pipefail",
        'export EXPORT_DIR="${EXPORT_DIR:-$SLURM_SUBMIT_DIR}"',
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="${MASTER_PORT:-29500}"',
        "srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec bash \"$EXPORT_DIR/launch.sh\"'",
    ]) + "\n"


def read_launch_counts(path: Path) -> tuple[int | None, int | None]:
    """(nodes, processes per node) of a launch script: our NNODES= / NPROC_PER_NODE= lines, or literal
    torchrun --nnodes / --nproc-per-node values."""
    text = path.read_text()
    found = {}
    for key, patterns in (("nodes", (r"^\s*NNODES=(\d+)\s*$", r"--nnodes[= ](\d+)\b")),
                          ("gpn", (r"^\s*NPROC_PER_NODE=(\d+)\s*$", r"--nproc[-_]per[-_]node[= ](\d+)\b"))):
        for pattern in patterns:
            match = re.search(pattern, text, re.MULTILINE)
            if match:
                found[key] = int(match.group(1))
                break
    return found.get("nodes"), found.get("gpn")
