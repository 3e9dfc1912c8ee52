"""Rich terminal rendering of predictions and plans."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from planner.cost.memory import GIB
from planner.cost.params import active_params, total_params
from planner.prediction import Prediction
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec

TIME_LABELS = {"compute": "compute", "recompute": "recompute", "bubble": "pipeline bubble",
               "tp_comm": "TP comm", "ep_comm": "EP all-to-all", "pp_comm": "PP comm",
               "dp_comm_exposed": "DP comm (exposed)",
               "optimizer": "optimizer", "host": "host overhead"}
BAR_WIDTH = 40


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def header(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec) -> Text:
    return Text.assemble(
        (f"{model.name}", "bold"), f" ({total_params(model) / 1e9:.2f} B params"
                                   + (f", {active_params(model) / 1e9:.2f} B active (top-{model.moe.top_k} of "
                                      f"{model.moe.num_experts} experts)" if model.moe else "")
                                   + f", {model.num_layers} layers) on ",
        (f"{cluster.name}", "bold"), f" ({cluster.num_nodes} x {cluster.gpus_per_node} {cluster.gpu.name}), ",
        f"global batch {training.global_batch} x {training.seq_len} tokens, {training.precision}"
        + (" (run in fp32 on CPUs)" if cluster.backend == "gloo" and training.precision != "fp32" else "")
        + f", {training.optimizer}")


def summary_table(pred: Prediction) -> Table:
    p = pred.predicted
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim")
    t.add_column()
    cfg = pred.config
    t.add_row("engine", pred.engine + (f"  ({pred.model.attention_kernel} attention)" if pred.model else ""))
    t.add_row("config", f"{cfg.short()}  ({cfg.num_microbatches} micro-batches, layers/chunk "
                        f"{_layers(cfg.layers_per_stage)})")
    t.add_row("step time", f"[bold]{_fmt_time(p.step_time_s)}[/]")
    t.add_row("throughput", f"{p.tokens_per_s:,.0f} tokens/s")
    t.add_row("MFU", f"[bold]{p.mfu:.1%}[/]  ({p.tflops_per_gpu:.1f} model TFLOP/s per GPU, "
                     f"{p.hardware_tflops_per_gpu:.1f} with recompute; FLOPs of the active parameters)")
    usable, budget = p.memory.usable_bytes, p.memory.budget_bytes or p.memory.usable_bytes
    fullest = max(p.memory.stages, key=lambda s: s.reserved)
    t.add_row("peak memory", f"{p.peak_memory_bytes / GIB:.2f} GiB allocated, {p.peak_reserved_bytes / GIB:.2f} "
                             f"GiB reserved of a {budget / GIB:.1f} GiB budget ({usable / GIB:.1f} GiB usable less "
                             f"{p.memory.headroom:.0%} headroom; stage {fullest.stage}, in the {fullest.peak_phase})")
    t.add_row("binds", p.binding)
    if pred.predicted.sources:
        t.add_row("sources", ", ".join(f"{k}: {v}" for k, v in pred.predicted.sources.items()))
    return t


def _layers(layers: list[int] | None) -> str:
    if not layers:
        return "-"
    if len(set(layers)) == 1:
        return f"{layers[0]} x {len(layers)}"
    return ",".join(map(str, layers)) if len(layers) <= 16 else f"{min(layers)}-{max(layers)} x {len(layers)}"


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
    for col in ("stage", "layers", "params", "grads", "optimizer", "activations", "other", "total", "reserved",
                "peaks in"):
        t.add_column(col, justify="right")
    budget = pred.predicted.memory.budget_bytes or pred.predicted.memory.usable_bytes
    shown = stages if len(stages) <= max_rows else stages[:max_rows // 2] + stages[-max_rows // 2:]
    for i, s in enumerate(shown):
        if len(stages) > max_rows and i == max_rows // 2:
            t.add_row("...", *[""] * 9)
        style = "red" if s.reserved > budget else ""
        t.add_row(str(s.stage), str(s.layers), *(f"{getattr(s, k) / GIB:.2f}" for k in
                  ("params", "grads", "optimizer", "activations", "other", "total", "reserved")), s.peak_phase,
                  style=style)
    return t


def render_prediction(console: Console, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                      pred: Prediction) -> None:
    title = "[green]fits[/]" if pred.feasible else f"[red]does not fit: {pred.reason}[/]"
    console.print(Panel(Group(header(model, cluster, training), Text(""), summary_table(pred)),
                        title=f"meshplan estimate: {title}", title_align="left"))
    console.print(time_bars(pred))
    console.print()
    console.print(memory_table(pred))


def why_slower(winner: Prediction, other: Prediction) -> str:
    """The two parts of the step that grew most against the winner, e.g. 'bubble +0.81 s, TP comm +0.30 s'."""
    a, b = winner.predicted.time.model_dump(), other.predicted.time.model_dump()
    deltas = sorted(((b[k] - a[k], k) for k in a), reverse=True)
    parts = [f"{TIME_LABELS[k]} +{_fmt_time(d)}" for d, k in deltas[:2] if d > 0]
    if not parts:
        return "ties on time, holds more memory"
    return ", ".join(parts)


def plan_table(preds: list[Prediction], title: str) -> Table:
    t = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col in ("#", "configuration", "layout", "step", "tokens/s", "MFU", "peak GiB", "bubble"):
        t.add_column(col, justify="left" if col in ("configuration", "layout") else "right")
    for i, p in enumerate(preds, 1):
        q = p.predicted
        t.add_row(str(i), p.config.short(), "-".join(p.config.layout), _fmt_time(q.step_time_s),
                  f"{q.tokens_per_s:,.0f}", f"{q.mfu:.1%}", f"{q.peak_reserved_bytes / GIB:.1f}",
                  f"{q.time.bubble / q.step_time_s:.1%}", style="bold" if i == 1 else "")
    return t


def runner_up_reasons(preds: list[Prediction]) -> list[str]:
    """One line per runner-up: how much slower than the winner and where the time went, or, for a step time
    that ties with the winner's (within 1%), how much less headroom it leaves."""
    best = preds[0].predicted
    lines = []
    for i, p in enumerate(preds[1:], 2):
        q = p.predicted
        change = f"{q.step_time_s / best.step_time_s - 1:+.2%} step time"
        if q.step_time_s <= best.step_time_s * 1.01:
            extra = (q.peak_reserved_bytes - best.peak_reserved_bytes) / GIB
            lines.append(f"#{i}: {change}, a tie within 1%: holds {extra:.2f} GiB more, less headroom")
        else:
            lines.append(f"#{i}: {change}: {why_slower(preds[0], p)}")
    return lines


def render_plan(console: Console, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                preds: list[Prediction], stats: dict, compare: Prediction | None, compare_rank: int | None) -> None:
    best = preds[0]
    console.print(Panel(Group(header(model, cluster, training), Text(""), summary_table(best)),
                        title="meshplan plan: [green]best configuration[/]", title_align="left"))
    console.print(plan_table(preds, f"top {len(preds)} of {stats['candidates']:,} candidates"))
    for line in runner_up_reasons(preds):
        console.print(f"  [dim]{line}[/]")
    console.print()
    console.print(time_bars(best))
    console.print()
    console.print(memory_table(best))
    console.print()
    rej = stats["rejected"]
    console.print(f"searched {stats['candidates']:,} distinct candidates in {stats['seconds']:.2f} s: "
                  f"{stats['evaluated']:,} fully costed; rejected {rej.get('out_of_memory', 0):,} out of memory, "
                  f"{rej.get('indivisible', 0):,} indivisible, {rej.get('dominated', 0):,} dominated "
                  f"(duplicates, or bounded above the top {len(preds)})")
    if stats.get("expert_parallelism"):
        console.print(stats["expert_parallelism"], soft_wrap=True, markup=False)
    naive = stats.get("naive_step_time_s")
    if best.config.placement is not None and naive:
        console.print(f"placement on the measured links: {naive / best.predicted.step_time_s - 1:+.1%} faster than "
                      f"rank r on device r ({_fmt_time(naive)} -> {_fmt_time(best.predicted.step_time_s)})")
    if compare is not None:
        cs = compare.predicted.step_time_s
        gain = cs / best.predicted.step_time_s - 1
        status = "" if compare.feasible else f" [red](does not fit: {compare.reason})[/]"
        console.print(f"your configuration {compare.config.short()}: step {_fmt_time(cs)}, MFU "
                      f"{compare.predicted.mfu:.1%}{status}; ranks #{compare_rank} among feasible candidates; "
                      f"the winner is {gain:+.1%} faster ({why_slower(best, compare) if gain > 0 else 'no gain'})")
