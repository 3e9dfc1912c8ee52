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

from planner.errors import InputError, MeshplanError

app = typer.Typer(
    name="meshplan", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Plan, predict and run data / tensor / pipeline parallel training of transformer models.\n\n"
         "Start with `meshplan estimate` (predict one configuration) or `meshplan plan` (search for the best).")



class _LazyConsole:
    """A rich Console made on first use: importing rich costs about 0.1 s that `--json` output never needs."""

    def __init__(self, **options):
        self._options, self._console = options, None

    def get(self):
        """The rich Console itself (for rich objects that take one)."""
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.get(), name)


# Tables need room: when output is not a terminal (pipes, CI logs), lay it out 120 columns wide.
stdout = _LazyConsole(highlight=False, width=None if sys.stdout.isatty() else 120)
stderr = _LazyConsole(stderr=True, highlight=False)

# ---------------------------------------------------------------------------------------------- options
ModelOpt = typer.Option(..., "--model", "-m", help="Preset name (see `meshplan presets`), a YAML/JSON ModelSpec "
                                                   "file, or a Hugging Face config.json.")
ClusterOpt = typer.Option(..., "--cluster", "-c", help="Built-in cluster (see `meshplan clusters`) or a cluster "
                                                       "YAML/JSON file (e.g. from `meshplan profile cluster`).")
NodesOpt = typer.Option(None, "--nodes", help="Override the cluster's node count (1-65,536; at most 262,144 GPUs).")
GpnOpt = typer.Option(None, "--gpus-per-node", help="Override the GPUs per node (1-1,024).")
BatchOpt = typer.Option(..., "--global-batch", "-b", help="Sequences per optimizer step (1-1,048,576).")
SeqOpt = typer.Option(2048, "--seq", "-s", help="Tokens per sequence (1-16,777,216).")
PrecisionOpt = typer.Option("bf16", "--precision", help="bf16 | fp16 (Megatron-style mixed precision), amp-bf16 "
                                                        "(autocast over fp32 params), fp32.")
OptimizerOpt = typer.Option("adamw", "--optimizer", help="adam | adamw | sgd (with momentum).")
OverlapOpt = typer.Option(None, "--overlap-grad-reduce/--no-overlap-grad-reduce",
                          help="Override the engine: the data-parallel gradient reduction overlaps the backward "
                               "(PyTorch DDP/FSDP2, Megatron --overlap-grad-reduce) or follows it (DeepSpeed's "
                               "engine). Default: the engine's.")
EngineOpt = typer.Option("meshplan", "--engine", "-e",
                         help="The software that will run the plan, whose kernels, recompute semantics, overlap "
                              "and memory recipe the prediction follows: meshplan (`meshplan run`), torchtitan, "
                              "megatron, deepspeed, or an engine YAML file (see cluster_specs/engines/).")
CompileOpt = typer.Option(False, "--compile/--no-compile",
                          help="torch.compile each block (meshplan and torchtitan engines): fewer, fused kernels.")
HeadroomOpt = typer.Option(0.10, "--memory-headroom",
                           help="Fraction of each GPU's usable memory a plan keeps free for allocator "
                                "fragmentation (0-0.9; default 0.1, README 'Memory headroom').")
ImbalanceOpt = typer.Option(None, "--moe-imbalance",
                            help="Mixture-of-experts models: routed tokens the busiest expert computes over the mean "
                                 "(1-64; default 1.25, README 'Mixture of experts').")
ProfileOpt = typer.Option(None, "--profile", help="A `meshplan profile model` file: its measured layer times and "
                                                  "activation bytes replace the analytical ones where model, "
                                                  "precision and sequence match.")


def _choice(value: str, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"'{value}' is not one of {', '.join(choices)}", field=field)
    return value


def load_inputs(model: str, cluster: str, nodes: Optional[int], gpus_per_node: Optional[int], global_batch: int,
                seq: int, precision: str, optimizer: str, overlap_grad_reduce: Optional[bool] = None,
                moe_imbalance: Optional[float] = None):
    """Specs from CLI arguments, validated."""
    from planner.limits import check_option
    from planner.loaders import load_cluster, load_model, parse_spec
    from planner.specs import TrainingSpec
    check_option(global_batch, "--global-batch")
    check_option(seq, "--seq")
    _choice(precision, "--precision", ("bf16", "fp16", "amp-bf16", "fp32"))
    _choice(optimizer, "--optimizer", ("adam", "adamw", "sgd"))
    m = load_model(model)
    c = load_cluster(cluster, nodes, gpus_per_node)
    t = parse_spec(TrainingSpec, dict(global_batch=global_batch, seq_len=seq, precision=precision,
                                      optimizer=optimizer, overlap_grad_reduce=overlap_grad_reduce,
                                      moe_imbalance=moe_imbalance), "training")
    return m, c, t


def write_new_file(path: Path, text: str, force: bool, field: str) -> None:
    """Write `text` to `path` (through a temporary file renamed over it), refusing to overwrite an existing
    file unless `force`, and anything but a regular file even then; InputError when it cannot be written."""
    from planner.outputs import check_new_output
    check_new_output(path, force, field)
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror or exc}", field=field) from None


def load_engine_opt(engine: str, compile: bool, training):
    """The engine of `--engine` / `--compile`, checked against the training precision."""
    from planner.engine import load_engine
    spec = load_engine(engine, compile)
    if training.precision not in spec.memory:
        raise InputError(f"engine {spec.name} does not train in {training.precision} (it runs "
                         f"{', '.join(spec.memory)})", field="--precision")
    return spec


def cost_model(model, cluster, training, profile: Optional[Path], engine=None, memory_headroom: float = 0.10):
    """The cost model, with measured layer costs when a profile file is given."""
    from planner.cost.model import CostModel
    if profile is None:
        return CostModel(model, cluster, training, engine=engine, memory_headroom=memory_headroom)
    from planner.profile_data import load_profile
    return CostModel(model, cluster, training, load_profile(profile), profile_name=profile.name, engine=engine,
                     memory_headroom=memory_headroom)


def parse_int_list(text: Optional[str], field: str) -> Optional[list[int]]:
    from planner.limits import check_option
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"'{text[:60]}' is not a comma-separated list of integers", field=field) from None
    for value in values:
        check_option(value, field)
    return values


# ---------------------------------------------------------------------------------------------- estimate
FromOpt = typer.Option(None, "--from", help="Predict an existing launch instead: an export directory, Megatron-LM "
                                            "arguments (JSON list or shell line), a torchtitan argument list, or a "
                                            "DeepSpeed ds_config.json (the world size from --nodes/--gpus-per-node "
                                            "or the directory's launch.sh; model and --seq from the options when "
                                            "the launch does not say).")


@app.command()
def estimate(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset name (see `meshplan presets`), a "
                                        "YAML/JSON ModelSpec file, or a Hugging Face config.json."),
    cluster: str = ClusterOpt, nodes: Optional[int] = NodesOpt,
    gpus_per_node: Optional[int] = GpnOpt,
    global_batch: Optional[int] = typer.Option(None, "--global-batch", "-b", help="Sequences per optimizer step."),
    seq: int = SeqOpt,
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (divides heads and kv heads)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline stages."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel degree (default: GPUs / (tp*pp))."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel degree (MoE models): experts sharded over ep ranks "
                                           "of the data-parallel group; divides dp and the expert count."),
    moe_imbalance: Optional[float] = ImbalanceOpt,
    mbs: int = typer.Option(1, "--mbs", help="Micro-batch size (sequences)."),
    vpp: int = typer.Option(1, "--vpp", help="Virtual stages per GPU (needs --schedule interleaved)."),
    zero: int = typer.Option(0, "--zero", help="ZeRO stage 0-3 over the data-parallel group."),
    recompute: str = typer.Option("none", "--recompute", help="Activation recomputation: none | selective | full."),
    sp: bool = typer.Option(False, "--sp/--no-sp", help="Sequence parallelism (needs tp > 1)."),
    schedule: str = typer.Option("1f1b", "--schedule", help="Pipeline schedule: gpipe | 1f1b | interleaved."),
    layers_per_stage: Optional[str] = typer.Option(None, "--layers-per-stage",
                                                   help="Blocks per pipeline chunk, e.g. 7,8,8,9."),
    precision: str = PrecisionOpt, optimizer: str = OptimizerOpt, overlap_grad_reduce: Optional[bool] = OverlapOpt,
    engine: str = EngineOpt, compile: bool = CompileOpt, profile: Optional[Path] = ProfileOpt,
    memory_headroom: float = HeadroomOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in README) to stdout."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write a plan file for `meshplan run`."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output if it exists."),
    from_launch: Optional[Path] = FromOpt,
):
    """Predict step time, MFU and memory per GPU of ONE parallel configuration.

    Example: meshplan estimate -m gpt3-175b -c dgx-a100-80gb --nodes 128 -b 1536 --tp 8 --pp 16 --recompute full --engine megatron

    (Under the default meshplan engine the same configuration does not fit: torch's pipelining keeps a receive buffer per micro-batch.)
    """
    from planner.loaders import parse_spec
    from planner.specs import ParallelConfig

    from planner.limits import check_option
    for value, field in ((tp, "--tp"), (pp, "--pp"), (dp, "--dp"), (mbs, "--mbs"), (vpp, "--vpp"), (ep, "--ep"),
                         (memory_headroom, "--memory-headroom"), (moe_imbalance, "--moe-imbalance")):
        check_option(value, field)
    if from_launch is not None:
        explicit = {name: value for name, value in ctx.params.items()
                    if ctx.get_parameter_source(name).name == "COMMANDLINE"}
        _estimate_launch(from_launch, cluster, nodes, gpus_per_node, model, seq, optimizer, explicit, profile,
                         as_json, output, force, memory_headroom)
        return
    for value, field in ((model, "--model"), (global_batch, "--global-batch")):
        if value is None:
            raise InputError("missing option (or give --from)", field=field)
    if zero not in (0, 1, 2, 3):
        raise InputError(f"{zero} is not one of 0, 1, 2, 3", field="--zero")
    _choice(recompute, "--recompute", ("none", "selective", "full"))
    _choice(schedule, "--schedule", ("gpipe", "1f1b", "interleaved"))
    m, c, t = load_inputs(model, cluster, nodes, gpus_per_node, global_batch, seq, precision, optimizer,
                          overlap_grad_reduce, moe_imbalance)
    if dp is None:   # a non-dividing tp*pp is reported by the config check, after the heads check
        dp = max(1, c.world_size // (tp * pp))
    cfg = parse_spec(ParallelConfig, dict(tp=tp, pp=pp, dp=dp, ep=ep, mbs=mbs, vpp=vpp, zero=zero, recompute=recompute,
                                          sp=sp, schedule=schedule,
                                          layers_per_stage=parse_int_list(layers_per_stage, "--layers-per-stage")),
                     "config")
    cost = cost_model(m, c, t, profile, load_engine_opt(engine, compile, t), memory_headroom)
    pred = cost.evaluate(cfg)
    if output is not None:
        from planner.plan import make_plan
        write_new_file(output, make_plan(cost.model, c, t, pred, engine=cost.engine).model_dump_json(indent=1), force, "--output")
    if as_json:
        print(pred.model_dump_json(indent=1))
        return
    from planner.report import render_prediction
    render_prediction(stdout.get(), cost.model, c, t, pred)
    if output is not None:
        stdout.print(f"plan written to {output}")


def _estimate_launch(path: Path, cluster: str, nodes, gpus_per_node, model, seq, optimizer, explicit, profile,
                     as_json: bool, output: Optional[Path], force: bool, memory_headroom: float = 0.10) -> None:
    """`estimate --from`: predict the launch at `path` (its engine is the target that wrote it)."""
    from planner.export.from_launch import cluster_for, estimate_inputs
    from planner.validate import check_config
    c = cluster_for(path, cluster, nodes, gpus_per_node)
    inputs = estimate_inputs(path, c, model, explicit, seq, optimizer)
    launch = inputs.launch
    for note in launch.notes:
        stderr.print(f"note: {note}", soft_wrap=True)
    engine = load_engine_opt(launch.engine, False, inputs.training)
    check_config(inputs.model, c, inputs.training, launch.config, engine)
    cost = cost_model(inputs.model, c, inputs.training, profile, engine, memory_headroom)
    pred = cost.evaluate(launch.config, launch.order)
    if output is not None:
        from planner.plan import make_plan
        write_new_file(output, make_plan(cost.model, c, inputs.training, pred, engine=cost.engine)
                       .model_dump_json(indent=1), force, "--output")
    if as_json:
        print(pred.model_dump_json(indent=1))
        return
    from planner.report import render_prediction
    stdout.print(f"{launch.target} launch {path} (engine: {launch.engine})")
    render_prediction(stdout.get(), inputs.model, c, inputs.training, pred)
    if output is not None:
        stdout.print(f"plan written to {output}")


# ---------------------------------------------------------------------------------------------- plan
def parse_compare(text: str, world_size: int):
    """A configuration to compare: 'tp=8,pp=4,mbs=1,zero=1,recompute=full,sp,schedule=1f1b' or a plan / estimate
    JSON file (its `config`)."""
    from planner.layout import DEFAULT_ORDER
    from planner.loaders import parse_spec, read_data_file
    from planner.search.space import Candidate
    from planner.specs import ParallelConfig
    from planner.loaders import exists
    path = Path(text)
    if path.suffix in (".json", ".yaml", ".yml") or exists(path):
        data = read_data_file(path, "--compare")
        data = data.get("config", data)
        if not isinstance(data, dict):
            raise InputError(f"'{path}' holds no configuration (a mapping, or one under `config`)", field="--compare")
        layout = data.get("layout", DEFAULT_ORDER)
        order = tuple(layout) if isinstance(layout, (list, tuple)) else (layout,)
        fields = {k: v for k, v in data.items() if k in ParallelConfig.model_fields}
    else:
        fields, order = {}, DEFAULT_ORDER
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in ParallelConfig.model_fields or key == "layers_per_stage":
                raise InputError(f"unknown key '{key[:40]}' (use tp, pp, dp, ep, vpp, mbs, zero, recompute, sp, "
                                 f"schedule)", field="--compare")
            fields[key] = value.strip() if value else "true"
        for key, value in fields.items():
            if key == "sp":
                fields[key] = value.lower() in ("1", "true", "yes")
            elif key in ("tp", "pp", "dp", "ep", "vpp", "mbs", "zero"):
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise InputError(f"{key}={value[:40]} is not a whole number", field="--compare") from None
    given = parse_spec(ParallelConfig, {**fields, "dp": fields.get("dp", 1)}, "--compare")   # types and ranges
    fields.setdefault("dp", max(1, world_size // (given.tp * given.pp)))
    cfg = parse_spec(ParallelConfig, fields, "--compare")
    if len(order) != 3 or set(order) != {"dp", "pp", "tp"}:
        raise InputError(f"layout {list(order)} must order tp, dp and pp", field="--compare")
    return cfg, Candidate(cfg.tp, cfg.pp, cfg.dp, cfg.vpp, cfg.mbs, cfg.zero, cfg.recompute, cfg.sp, cfg.schedule,
                          order, ep=cfg.ep)


def _fit_hints(closest, constraints, cost) -> str:
    """What would make the closest candidate fit."""
    model, cluster, training = cost.model, cost.cluster, cost.training
    from planner.cost.memory import GIB, state_bytes
    from planner.cost.params import total_params
    hints = []
    c = closest.config
    if c.recompute != "full":
        hints.append("full activation recomputation" + (" (drop --recompute)" if constraints.recompute else ""))
    top_zero = max(cost.engine.zero_stages)
    if c.zero < top_zero:
        hints.append(f"ZeRO-{top_zero}" + (" (drop --zero / --no-zero3)" if constraints.zero is not None
                                           or constraints.max_zero < 3 else ""))
    if c.mbs > 1:
        hints.append("micro-batch 1" + (" (drop --mbs)" if constraints.mbs else ""))
    recipe = cost.engine.recipe(cost.run_precision, max(cost.engine.zero_stages), 2)
    states = total_params(model) * state_bytes(recipe, training.optimizer, 0, 1).total
    budget = closest.predicted.memory.budget_bytes or closest.predicted.memory.usable_bytes
    gpus = -(-states // (0.8 * budget))
    nodes = max(cluster.num_nodes + 1, -(-int(gpus) // cluster.gpus_per_node))
    hints.append(f"more GPUs: the model states alone are {states / GIB:,.0f} GiB, so at least ~{int(gpus):,} GPUs "
                 f"(--nodes {nodes} or more)")
    return "; ".join(hints)


def _check_pins(model, cluster, training, tp, pp, dp, mbs) -> None:
    """Pinned degrees that can never work, as the same one-line errors `estimate` gives."""
    from planner.validate import tp_shards, valid_tp
    gpus = cluster.world_size
    if tp is not None and (tp_shards(model, tp) or gpus % tp):
        raise InputError(f"tp {tp} must divide num_heads {model.num_heads}, num_kv_heads {model.kv_heads}, "
                         f"ffn_hidden_size {model.ffn_size} and the {gpus} GPUs (valid: "
                         f"{', '.join(map(str, valid_tp(model, gpus)))})", field="--tp")
    if pp is not None and (pp > model.num_layers or gpus % pp):
        raise InputError(f"pp {pp} must divide the {gpus} GPUs and be at most the {model.num_layers} layers",
                         field="--pp")
    if dp is not None and (gpus % dp or training.global_batch % dp):
        raise InputError(f"dp {dp} must divide the {gpus} GPUs and the global batch {training.global_batch}",
                         field="--dp")
    if mbs is not None and training.global_batch % mbs:
        raise InputError(f"mbs {mbs} must divide the global batch {training.global_batch}", field="--mbs")


@app.command()
def plan(
    model: str = ModelOpt, cluster: str = ClusterOpt, nodes: Optional[int] = NodesOpt,
    gpus_per_node: Optional[int] = GpnOpt, global_batch: int = BatchOpt, seq: int = SeqOpt,
    precision: str = PrecisionOpt, optimizer: str = OptimizerOpt, overlap_grad_reduce: Optional[bool] = OverlapOpt,
    engine: str = EngineOpt, compile: bool = CompileOpt, profile: Optional[Path] = ProfileOpt,
    memory_headroom: float = HeadroomOpt,
    tp: Optional[int] = typer.Option(None, "--tp", help="Pin the tensor-parallel degree."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pin the pipeline degree."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Pin the data-parallel degree."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Pin the expert-parallel degree (MoE models; default: "
                                                        "search every ep dividing dp and the expert count)."),
    moe_imbalance: Optional[float] = ImbalanceOpt,
    mbs: Optional[int] = typer.Option(None, "--mbs", help="Pin the micro-batch size."),
    vpp: Optional[int] = typer.Option(None, "--vpp", help="Pin the virtual stages per GPU."),
    zero: Optional[int] = typer.Option(None, "--zero", help="Pin the ZeRO stage (0-3)."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="Pin recomputation: none | selective | full."),
    sp: Optional[bool] = typer.Option(None, "--sp/--no-sp", help="Pin sequence parallelism on or off."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Pin the schedule: gpipe | 1f1b | interleaved."),
    max_tp: Optional[int] = typer.Option(None, "--max-tp", help="Largest tensor-parallel degree to consider."),
    max_pp: Optional[int] = typer.Option(None, "--max-pp", help="Largest pipeline degree to consider."),
    max_mbs: Optional[int] = typer.Option(None, "--max-mbs", help="Largest micro-batch to consider."),
    no_zero3: bool = typer.Option(False, "--no-zero3", help="Consider ZeRO stages 0-2 only."),
    allow_cross_node_tp: bool = typer.Option(False, "--allow-cross-node-tp",
                                             help="Let tensor-parallel groups span nodes."),
    top: int = typer.Option(5, "--top", "-k", help="How many plans to list."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Rank a configuration against the winner: "
                                          "'tp=8,pp=4,mbs=1,zero=1,recompute=full,sp', a plan/estimate JSON, or "
                                          "an existing launch (see `estimate --from`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan JSON (runners-up under `alternatives`)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the winning plan for `meshplan run`."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also draw the plan as a self-contained HTML page "
                                                             "(as `meshplan report` does)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --output / --html if they exist."),
):
    """Search every parallel configuration and pick the fastest that fits in memory.

    With node groups (-c mixed-h100-a100, -c two-islands): each stage on one group, placed by an ILP (README).

    Example: meshplan plan -m llama3-70b -c dgx-h100 --nodes 64 -b 1024 --seq 8192 -o plan.json
    """
    from planner.errors import NoFeasiblePlan
    from planner.plan import SearchStats, make_plan
    from planner.search.search import search
    from planner.search.space import Constraints

    from planner.limits import check_option
    for value, field in ((tp, "--tp"), (pp, "--pp"), (dp, "--dp"), (mbs, "--mbs"), (vpp, "--vpp"),
                         (max_tp, "--max-tp"), (max_pp, "--max-pp"), (max_mbs, "--max-mbs"), (top, "--top"),
                         (memory_headroom, "--memory-headroom"), (ep, "--ep"), (moe_imbalance, "--moe-imbalance")):
        check_option(value, field)
    if zero is not None and zero not in (0, 1, 2, 3):
        raise InputError(f"{zero} is not one of 0, 1, 2, 3", field="--zero")
    if recompute is not None:
        _choice(recompute, "--recompute", ("none", "selective", "full"))
    if schedule is not None:
        _choice(schedule, "--schedule", ("gpipe", "1f1b", "interleaved"))
    m, c, t = load_inputs(model, cluster, nodes, gpus_per_node, global_batch, seq, precision, optimizer,
                          overlap_grad_reduce, moe_imbalance)
    _check_pins(m, c, t, tp, pp, dp, mbs)
    if ep is not None and ep > 1 and m.moe is None:
        raise InputError(f"ep {ep} needs a mixture-of-experts model ({m.name} is dense)", field="--ep")
    if html is not None:
        from planner.html_report.command import check_output
        check_output(html, force, "--html")
    constraints = Constraints(tp=tp, pp=pp, dp=dp, ep=ep, vpp=vpp, mbs=mbs, zero=zero, recompute=recompute, sp=sp,
                              schedule=schedule, max_tp=max_tp, max_pp=max_pp, max_mbs=max_mbs,
                              max_zero=2 if no_zero3 else 3, allow_cross_node_tp=allow_cross_node_tp)
    if c.heterogeneous:     # node groups: stages on groups by the ILP of planner/hetero (README "Node groups")
        from planner.hetero.command import hetero_plan, render_hetero, unsupported
        for given, option in ((compare, "--compare"), (html, "--html"), (profile, "--profile")):
            if given is not None:
                unsupported(option)
        the_plan, result, _ = hetero_plan(m, c, t, constraints, load_engine_opt(engine, compile, t),
                                          memory_headroom, top)
        if output is not None:
            write_new_file(output, the_plan.model_dump_json(indent=1), force, "--output")
        if as_json:
            print(the_plan.model_dump_json(indent=1))
            return
        render_hetero(stdout.get(), the_plan, result)
        if output is not None:
            stdout.print(f"plan written to {output}")
        return
    cost = cost_model(m, c, t, profile, load_engine_opt(engine, compile, t), memory_headroom)
    compare_cand = None
    if compare is not None:
        from planner.validate import check_config
        from planner.export.from_launch import compare_candidate, is_launch
        if is_launch(compare):
            compare_cfg, compare_cand = compare_candidate(Path(compare), m, c, t)
        else:
            compare_cfg, compare_cand = parse_compare(compare, c.world_size)
        check_config(m, c, t, compare_cfg, cost.engine)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("searching"), BarColumn(), TextColumn("{task.completed}/{task.total} costed"),
                  TimeElapsedColumn(), console=stderr.get(), transient=True, disable=as_json) as bar:
        task = bar.add_task("search", total=0)
        result = search(m, c, t, constraints, top_k=top, compare=compare_cand, cost=cost,
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    from planner.search.expert_parallel import explain
    stats = SearchStats(seconds=result.seconds, candidates=result.candidates, evaluated=result.evaluated,
                        rejected=dict(result.rejected), naive_step_time_s=result.naive_step,
                        expert_parallelism=explain(cost, result.top[0]) if result.top else None)
    if not result.top:
        closest = cost.prediction(result.closest) if result.closest else None
        if closest is None:
            raise NoFeasiblePlan("no configuration satisfies the pins and limits (nothing divides evenly); "
                                 "relax --tp/--pp/--dp/--mbs or the --max-* limits", field="plan")
        message = (f"no configuration fits in memory ({result.candidates:,} candidates); the closest, "
                   f"{closest.config.short()}, {closest.reason.removeprefix('out of memory: ')}. To fit, try "
                   f"{_fit_hints(closest, constraints, cost)}")
        if as_json:
            print(json.dumps({"feasible": False, "reason": message, "closest": closest.model_dump(),
                              "search": stats.model_dump()}, indent=1))
            raise typer.Exit(NoFeasiblePlan.exit_code)
        raise NoFeasiblePlan(message)
    preds = [cost.prediction(core) for core in result.top]
    the_plan = make_plan(cost.model, c, t, preds[0], alternatives=preds[1:], search=stats,
                         engine=cost.engine)
    if output is not None:
        write_new_file(output, the_plan.model_dump_json(indent=1), force, "--output")
    if html is not None:
        from planner.html_report import build_html
        write_new_file(html, build_html(the_plan, core=result.top[0]), force, "--html")
    if as_json:
        print(the_plan.model_dump_json(indent=1))
        return
    from planner.report import render_plan
    compare_pred = cost.prediction(result.compare) if result.compare is not None else None
    render_plan(stdout.get(), cost.model, c, t, preds, stats.model_dump(), compare_pred, result.compare_rank)
    if output is not None:
        stdout.print(f"plan written to {output}")
    if html is not None:
        stdout.print(f"report written to {html}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------- export
@app.command()
def export(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="A plan file from `meshplan plan -o` or `estimate -o`."),
    to: str = typer.Option(..., "--to", help="megatron | deepspeed | torchtitan."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write (created if missing)."),
    exact: bool = typer.Option(False, "--exact", help="Refuse instead of writing the nearest configuration the "
                                                      "target can express."),
    force: bool = typer.Option(False, "--force", help="Overwrite files the directory already holds."),
):
    """Write a plan as a launch of Megatron-LM, DeepSpeed or torchtitan: launch.sh (the torchrun line of each
    node), slurm.sbatch, and args.json / args.txt (Megatron-LM, torchtitan) or ds_config.json (DeepSpeed).

    What the target cannot express is exported as the nearest configuration it can, with each change and the
    re-estimated prediction shown (--exact refuses instead). Read an export back with `estimate --from DIR`.
    Mixture-of-experts plans carry their experts and ep: Megatron-LM's MoE flags, torchtitan's qwen3_30b_a3b
    with expert_parallel_degree, DeepSpeed's AutoEP (expert_parallel) section.

    Example: meshplan export plan.json --to megatron -o megatron_job
    """
    from planner.cost.memory import GIB
    from planner.export import export_plan
    from planner.plan import load_plan
    _choice(to, "--to", ("megatron", "deepspeed", "torchtitan"))
    the_plan = load_plan(plan_file)
    if the_plan.cluster.heterogeneous:
        raise InputError("is a plan on node groups: the exported launches run one GPU type", field=str(plan_file))
    result = export_plan(the_plan, to)
    if result.adjusted.changes and exact:
        raise InputError(f"{to} cannot express the plan exactly: {result.adjusted.changes[0]}", field="--exact")
    if output.exists() and not output.is_dir():
        raise InputError(f"'{output}' exists and is not a directory", field="--output")
    if not output.parent.exists():
        raise InputError(f"directory '{output.parent}' does not exist", field="--output")
    output.mkdir(exist_ok=True)
    for name, text in result.files.items():
        write_new_file(output / name, text, force, "--output")
        if name.endswith((".sh", ".sbatch")):
            (output / name).chmod(0o755)
    for change in result.adjusted.changes:
        stdout.print(f"changed: {change}", soft_wrap=True)
    if result.after is not None:
        b, a = result.before.predicted, result.after.predicted
        fit = "fits" if result.after.feasible else f"[red]does not fit[/]: {result.after.reason}"
        stdout.print(f"prediction moves: step {b.step_time_s:.4g} s -> {a.step_time_s:.4g} s "
                     f"({a.step_time_s / b.step_time_s - 1:+.1%}), MFU {b.mfu:.1%} -> {a.mfu:.1%}, peak "
                     f"{b.peak_reserved_bytes / GIB:.1f} -> {a.peak_reserved_bytes / GIB:.1f} GiB ({fit})",
                     soft_wrap=True)
    stdout.print(f"wrote {', '.join(str(output / name) for name in result.files)}", soft_wrap=True)
    if result.engine_warning:
        stderr.print(f"warning: {result.engine_warning}", soft_wrap=True)


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
        if c.heterogeneous:
            groups = c.groups_raw()
            table.add_row(name, " + ".join(f"{g.count * g.gpus_per_node} {g.gpu_type}" for g in groups),
                          "", "/".join(str(g.gpus_per_node) for g in groups), "node groups", "")
            continue
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


# ---------------------------------------------------------------------------------------------- heavy commands
# `report`, `calibrate`, `run` and `profile` live with the code they drive. Their modules are imported, and the
# commands registered, only when one of them is invoked or the command list is shown, so `estimate` and `plan`
# start fast (`run` and `profile` import torch only inside the commands).
LAZY_COMMANDS = {"report": ("planner.html_report.command", "report_command"),
                 "calibrate": ("planner.calibration.command", "calibrate_command"),
                 "run": ("runtime.cli", "run_command"),
                 "profile": ("profiler.cli", "profile_app")}


def register_commands(names: Optional[list[str]] = None) -> None:
    """Add the lazily imported commands `names` (default: all of them) to `app`, in LAZY_COMMANDS' order."""
    import importlib
    registered = {info.name for info in app.registered_commands} | {info.name for info in app.registered_groups}
    for name, (module, attr) in LAZY_COMMANDS.items():
        if (names is not None and name not in names) or name in registered:
            continue
        target = getattr(importlib.import_module(module), attr)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)


def _invoked_command(argv: list[str]) -> Optional[str]:
    """The sub-command named on the command line (the first argument not an option), or None."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# ---------------------------------------------------------------------------------------------- entry point
def _error_line(text: str) -> None:
    """One line on stderr: 'error: <text>', the text printed as is (never read as rich markup)."""
    from rich.markup import escape
    one_line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    stderr.print(f"[red]error:[/] {escape(one_line)}", soft_wrap=True)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    name = _invoked_command(sys.argv[1:] if argv is None else argv)
    eager = {info.name or info.callback.__name__ for info in app.registered_commands}
    register_commands([name] if name in LAZY_COMMANDS or name in eager else None)
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="meshplan", standalone_mode=False)
    except MeshplanError as exc:
        _error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        # a path the user gave that the OS refuses (name too long, ...), wherever it was first touched
        where = f"'{exc.filename}': " if exc.filename else ""
        _error_line(f"{where}{exc.strerror or exc}")
        sys.exit(2)
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
            _error_line(f"{exc.format_message()} (see --help)")
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
