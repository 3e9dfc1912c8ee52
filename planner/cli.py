"""`meshplan`: the command-line interface.

Every user error ends as one line on stderr naming the field, and exit code 2 (3: no feasible plan).
Commands that need torch (`run`, `profile`) import it only when they run, so `estimate` and `plan` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from planner.errors import InputError, MeshplanError

app = typer.Typer(
    name="meshplan", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Plan, predict and run data / tensor / pipeline parallel training of transformer models.\n\n"
         "Start with `meshplan estimate` (predict one configuration) or `meshplan plan` (search for the best).")

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)

# ---------------------------------------------------------------------------------------------- options
ModelOpt = typer.Option(..., "--model", "-m", help="Preset name (see `meshplan presets`), a YAML/JSON ModelSpec "
                                                   "file, or a Hugging Face config.json.")
ClusterOpt = typer.Option(..., "--cluster", "-c", help="Built-in cluster (see `meshplan clusters`) or a cluster "
                                                       "YAML/JSON file (e.g. from `meshplan profile cluster`).")
NodesOpt = typer.Option(None, "--nodes", help="Override the cluster's node count.")
GpnOpt = typer.Option(None, "--gpus-per-node", help="Override the GPUs per node.")
BatchOpt = typer.Option(..., "--global-batch", "-b", help="Sequences per optimizer step.")
SeqOpt = typer.Option(2048, "--seq", "-s", help="Tokens per sequence.")
PrecisionOpt = typer.Option("bf16", "--precision", help="bf16 | fp16 (Megatron-style mixed precision), amp-bf16 "
                                                        "(autocast over fp32 params), fp32.")
OptimizerOpt = typer.Option("adamw", "--optimizer", help="adam | adamw | sgd (with momentum).")


def _choice(value: str, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"'{value}' is not one of {', '.join(choices)}", field=field)
    return value


def load_inputs(model: str, cluster: str, nodes: Optional[int], gpus_per_node: Optional[int], global_batch: int,
                seq: int, precision: str, optimizer: str):
    """Specs from CLI arguments, validated."""
    from planner.loaders import load_cluster, load_model, parse_spec
    from planner.specs import TrainingSpec
    m = load_model(model)
    c = load_cluster(cluster, nodes, gpus_per_node)
    _choice(precision, "--precision", ("bf16", "fp16", "amp-bf16", "fp32"))
    _choice(optimizer, "--optimizer", ("adam", "adamw", "sgd"))
    for value, field in ((global_batch, "--global-batch"), (seq, "--seq")):
        if value < 1:
            raise InputError(f"must be >= 1 (got {value})", field=field)
    t = parse_spec(TrainingSpec, dict(global_batch=global_batch, seq_len=seq, precision=precision,
                                      optimizer=optimizer), "training")
    return m, c, t


def write_new_file(path: Path, text: str, force: bool, field: str) -> None:
    """Write `text` to `path`, refusing to overwrite an existing file unless `force`."""
    if path.exists() and not force:
        raise InputError(f"'{path}' exists; pass --force to overwrite it", field=field)
    if not path.parent.exists():
        raise InputError(f"directory '{path.parent}' does not exist", field=field)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def parse_int_list(text: Optional[str], field: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"'{text}' is not a comma-separated list of integers", field=field) from None


# ---------------------------------------------------------------------------------------------- estimate
@app.command()
def estimate(
    model: str = ModelOpt, cluster: str = ClusterOpt, nodes: Optional[int] = NodesOpt,
    gpus_per_node: Optional[int] = GpnOpt, global_batch: int = BatchOpt, seq: int = SeqOpt,
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (divides heads and kv heads)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline stages."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel degree (default: GPUs / (tp*pp))."),
    mbs: int = typer.Option(1, "--mbs", help="Micro-batch size (sequences)."),
    vpp: int = typer.Option(1, "--vpp", help="Virtual stages per GPU (needs --schedule interleaved)."),
    zero: int = typer.Option(0, "--zero", help="ZeRO stage 0-3 over the data-parallel group."),
    recompute: str = typer.Option("none", "--recompute", help="Activation recomputation: none | selective | full."),
    sp: bool = typer.Option(False, "--sp/--no-sp", help="Sequence parallelism (needs tp > 1)."),
    schedule: str = typer.Option("1f1b", "--schedule", help="Pipeline schedule: gpipe | 1f1b | interleaved."),
    layers_per_stage: Optional[str] = typer.Option(None, "--layers-per-stage",
                                                   help="Blocks per pipeline chunk, e.g. 7,8,8,9."),
    precision: str = PrecisionOpt, optimizer: str = OptimizerOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in README) to stdout."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write a plan file for `meshplan run`."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
):
    """Predict step time, MFU and memory per GPU of ONE parallel configuration.

    Example: meshplan estimate -m gpt3-175b -c dgx-a100-80gb --nodes 128 -b 1536 --tp 8 --pp 16 --recompute full
    """
    from planner.cost.model import CostModel
    from planner.loaders import parse_spec
    from planner.plan import make_plan
    from planner.specs import ParallelConfig

    m, c, t = load_inputs(model, cluster, nodes, gpus_per_node, global_batch, seq, precision, optimizer)
    _choice(recompute, "--recompute", ("none", "selective", "full"))
    _choice(schedule, "--schedule", ("gpipe", "1f1b", "interleaved"))
    if zero not in (0, 1, 2, 3):
        raise InputError(f"{zero} is not one of 0, 1, 2, 3", field="--zero")
    for value, field in ((tp, "--tp"), (pp, "--pp"), (mbs, "--mbs"), (vpp, "--vpp")):
        if value < 1:
            raise InputError(f"must be >= 1 (got {value})", field=field)
    if dp is None:   # a non-dividing tp*pp is reported by the config check, after the heads check
        dp = max(1, c.world_size // (tp * pp))
    cfg = parse_spec(ParallelConfig, dict(tp=tp, pp=pp, dp=dp, mbs=mbs, vpp=vpp, zero=zero, recompute=recompute,
                                          sp=sp, schedule=schedule,
                                          layers_per_stage=parse_int_list(layers_per_stage, "--layers-per-stage")),
                     "config")
    cost = CostModel(m, c, t)
    pred = cost.evaluate(cfg)
    if output is not None:
        write_new_file(output, make_plan(m, c, t, pred).model_dump_json(indent=1), force, "--output")
    if as_json:
        print(pred.model_dump_json(indent=1))
        return
    from planner.report import render_prediction
    render_prediction(stdout, m, c, t, pred)
    if output is not None:
        stdout.print(f"plan written to {output}")


# ---------------------------------------------------------------------------------------------- listings
@app.command()
def presets():
    """List the built-in model presets."""
    from rich.table import Table

    from planner.cost.params import total_params
    from planner.presets import PRESETS
    table = Table("preset", "params", "layers", "hidden", "heads/kv", "MLP", "vocab", box=None)
    for name, m in PRESETS.items():
        table.add_row(name, f"{total_params(m) / 1e9:.2f} B", str(m.num_layers), str(m.hidden_size),
                      f"{m.num_heads}/{m.kv_heads}", f"{m.mlp} {m.ffn_size}", str(m.vocab_size))
    stdout.print(table)


@app.command()
def clusters():
    """List the built-in cluster specs (cluster_specs/*.yaml)."""
    from rich.table import Table

    from planner.cost.memory import GIB
    from planner.loaders import cluster_names, load_cluster
    table = Table("cluster", "GPU", "memory", "GPUs/node", "intra GB/s", "NICs x GB/s", box=None)
    for name in cluster_names():
        c = load_cluster(name)
        table.add_row(name, c.gpu.name, f"{c.gpu.memory_bytes / GIB:.0f} GiB", str(c.gpus_per_node),
                      f"{c.intra_node.bandwidth / 1e9:.0f}", f"{c.nics_per_node} x {c.inter_node.bandwidth / 1e9:.0f}")
    stdout.print(table)


@app.command()
def schema(
    kind: str = typer.Argument(..., help="model | cluster | training | config | prediction | plan"),
):
    """Print the JSON schema of a spec or output file."""
    from planner.plan import Plan
    from planner.prediction import Prediction
    from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec
    kinds = {"model": ModelSpec, "cluster": ClusterSpec, "training": TrainingSpec, "config": ParallelConfig,
             "prediction": Prediction, "plan": Plan}
    _choice(kind, "kind", tuple(kinds))
    print(json.dumps(kinds[kind].model_json_schema(), indent=1))


# ---------------------------------------------------------------------------------------------- torch commands
# `run` and `profile` live with the code they drive; their modules import torch only inside the commands.
from profiler.cli import profile_app  # noqa: E402
from runtime.cli import run_command  # noqa: E402

app.command("run")(run_command)
app.add_typer(profile_app, name="profile")


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[list[str]] = None) -> None:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="meshplan", standalone_mode=False)
    except MeshplanError as exc:
        stderr.print(f"[red]error:[/] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        # typer's (click's) own parse errors: one line instead of a usage box
        name = type(exc).__name__
        if name == "NoArgsIsHelpError":
            print(exc.ctx.get_help())
            sys.exit(0)
        if name == "Abort":
            stderr.print("aborted")
            sys.exit(1)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            stderr.print(f"[red]error:[/] {exc.format_message()} (see --help)", soft_wrap=True)
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
