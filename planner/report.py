"""Rich terminal rendering of predictions and plans."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from planner.cost.memory import GIB
from planner.cost.params import total_params
from planner.prediction import Prediction
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

TIME_LABELS = {"compute": "compute", "recompute": "recompute", "bubble": "pipeline bubble",
               "tp_comm": "TP comm", "pp_comm": "PP comm", "dp_comm_exposed": "DP comm (exposed)",
               "optimizer": "optimizer"}
BAR_WIDTH = 40


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def header(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec) -> Text:
    return Text.assemble(
        (f"{model.name}", "bold"), f" ({total_params(model) / 1e9:.2f} B params, {model.num_layers} layers) on ",
        (f"{cluster.name}", "bold"), f" ({cluster.num_nodes} x {cluster.gpus_per_node} {cluster.gpu.name}), ",
        f"global batch {training.global_batch} x {training.seq_len} tokens, {training.precision}, "
        f"{training.optimizer}")


def summary_table(pred: Prediction) -> Table:
    p = pred.predicted
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim")
    t.add_column()
    cfg = pred.config
    t.add_row("config", f"{cfg.short()}  ({cfg.num_microbatches} micro-batches, layers/chunk "
                        f"{_layers(cfg.layers_per_stage)})")
    t.add_row("step time", f"[bold]{_fmt_time(p.step_time_s)}[/]")
    t.add_row("throughput", f"{p.tokens_per_s:,.0f} tokens/s")
    t.add_row("MFU", f"[bold]{p.mfu:.1%}[/]  ({p.tflops_per_gpu:.1f} model TFLOP/s per GPU, "
                     f"{p.hardware_tflops_per_gpu:.1f} with recompute)")
    usable = p.memory.usable_bytes
    t.add_row("peak memory", f"{p.peak_memory_bytes / GIB:.2f} GiB allocated, {p.peak_reserved_bytes / GIB:.2f} "
                             f"GiB reserved of {usable / GIB:.1f} GiB usable (stage "
                             f"{max(p.memory.stages, key=lambda s: s.reserved).stage})")
    t.add_row("binds", p.binding)
    if pred.predicted.sources:
        t.add_row("sources", ", ".join(f"{k}: {v}" for k, v in pred.predicted.sources.items()))
    return t


def _layers(layers: list[int] | None) -> str:
    if not layers:
        return "-"
    if len(set(layers)) == 1:
        return f"{layers[0]} x {len(layers)}"
    return ",".join(map(str, layers)) if len(layers) <= 16 else f"{layers[0]},...,{layers[-1]}"


def time_bars(pred: Prediction) -> Table:
    time = pred.predicted.time.model_dump()
    step = pred.predicted.step_time_s
    t = Table(title="step time on the critical path", title_justify="left", box=None, pad_edge=False)
    t.add_column("part")
    t.add_column("time", justify="right")
    t.add_column("share", justify="right")
    t.add_column("")
    for key, label in TIME_LABELS.items():
        v = time[key]
        if v <= 0:
            continue
        n = round(BAR_WIDTH * v / step)
        t.add_row(label, _fmt_time(v), f"{v / step:.1%}", Text("█" * n, style="cyan"))
    return t


def memory_table(pred: Prediction, max_rows: int = 12) -> Table:
    stages = pred.predicted.memory.stages
    t = Table(title="memory per GPU by pipeline stage (GiB)", title_justify="left", box=None, pad_edge=False)
    for col in ("stage", "layers", "params", "grads", "optimizer", "activations", "other", "total", "reserved"):
        t.add_column(col, justify="right")
    usable = pred.predicted.memory.usable_bytes
    shown = stages if len(stages) <= max_rows else stages[:max_rows // 2] + stages[-max_rows // 2:]
    for i, s in enumerate(shown):
        if len(stages) > max_rows and i == max_rows // 2:
            t.add_row("...", *[""] * 8)
        style = "red" if s.reserved > usable else ""
        t.add_row(str(s.stage), str(s.layers), *(f"{getattr(s, k) / GIB:.2f}" for k in
                  ("params", "grads", "optimizer", "activations", "other", "total", "reserved")), style=style)
    return t


def render_prediction(console: Console, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                      pred: Prediction) -> None:
    title = "[green]fits[/]" if pred.feasible else f"[red]does not fit: {pred.reason}[/]"
    console.print(Panel(Group(header(model, cluster, training), Text(""), summary_table(pred)),
                        title=f"meshplan estimate: {title}", title_align="left"))
    console.print(time_bars(pred))
    console.print()
    console.print(memory_table(pred))
