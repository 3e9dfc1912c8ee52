"""`meshplan plan` on a cluster with node groups: search, plan file, terminal report."""

from __future__ import annotations

from rich.console import Console

from planner.cost.memory import GIB
from planner.cost.params import total_params
from planner.errors import NoFeasiblePlan
from planner.hetero.cost import HeteroCore, HeteroCost
from planner.hetero.groups import used_groups_cluster
from planner.hetero.report import explain, prediction, rank_rows
from planner.hetero.search import HeteroResult, search_hetero
from planner.plan import NodeGroupsReport, Plan, RankEntry, SearchStats
from planner.search.space import Constraints


def hetero_plan(model, cluster, training, constraints: Constraints, engine, memory_headroom: float,
                top_k: int) -> tuple[Plan, HeteroResult, HeteroCost]:
    """The plan file of the best plan on a cluster of node groups; NoFeasiblePlan when nothing fits."""
    result = search_hetero(model, cluster, training, constraints, top_k, engine, memory_headroom)
    hc = result.cost
    if not result.top:
        closest = result.closest
        if closest is None and result.rejected["out_of_memory"]:
            raise NoFeasiblePlan(f"no configuration fits in memory ({result.candidates:,} candidates): in none "
                                 f"can the pipeline's positions hold the model's {hc.model.num_layers} layers",
                                 field="plan")
        if closest is None:
            raise NoFeasiblePlan(f"no configuration fills the node groups of {cluster.name} it uses evenly (a "
                                 f"stage is tp x dp GPUs of one group, and every group used must hold whole "
                                 f"stages) within the pins and limits", field="plan")
        worst = prediction(hc, closest)
        raise NoFeasiblePlan(f"no configuration fits in memory ({result.candidates:,} candidates); the closest, "
                             f"{worst.config.short()}, {worst.reason.removeprefix('out of memory: ')}")
    cores = result.top
    sub = used_groups_cluster(cluster, cores[0].used) if cores[0].used != hc.used else None
    if sub is not None:      # groups left idle: the plan is for the groups it uses, as `meshplan run` takes it
        cluster, hc, cores = sub, *_on_used_groups(hc, sub, [c for c in cores if c.used == cores[0].used])
    preds = [prediction(hc, core) for core in cores]
    best = cores[0]
    stats = SearchStats(seconds=result.seconds, candidates=result.candidates, evaluated=result.evaluated,
                        rejected=dict(result.rejected),
                        naive_step_time_s=result.naive.step if result.naive is not None else None)
    groups = NodeGroupsReport(
        stage_groups=[hc.groups[k].name for k in best.groups], assignment=best.method,
        naive_step_time_s=result.naive.step if result.naive else None,
        naive_feasible=result.naive.feasible if result.naive else None,
        single_group_step_time_s={p.group: p.step for p in result.parts}, explanation=explain(result.cost, result))
    plan = Plan(model=hc.model, cluster=cluster, training=training, engine=hc.engine, model_summary=preds[0].model,
                feasible=True, reason="", config=preds[0].config, predicted=preds[0].predicted,
                rank_layout=[RankEntry(**row) for row in rank_rows(hc, best)], alternatives=preds[1:],
                search=stats, node_groups=groups)
    return plan, result, hc


def _on_used_groups(hc: HeteroCost, sub, cores: list[HeteroCore]) -> tuple[HeteroCost, list[HeteroCore]]:
    """The cost models of the cluster cut to the groups `cores` use, and the cores costed there (the same
    numbers: each group is priced alone, the links between the kept groups are the same)."""
    used = cores[0].used
    on_sub = HeteroCost(hc.model, sub, hc.training, hc.engine, hc.costs[0].memory_headroom)
    index = {k: i for i, k in enumerate(used)}
    return on_sub, [on_sub.evaluate(c.cand, tuple(index[k] for k in c.groups), c.layers, c.method) for c in cores]


def render_hetero(console: Console, plan: Plan, result: HeteroResult) -> None:
    """The winner, the runners-up, and the explanation."""
    m, c, t = plan.model, plan.cluster, plan.training
    groups = ", ".join(f"{g.name}: {g.count} x {g.gpus_per_node} {c.gpu_types[g.gpu_type].name}"
                       for g in c.groups_raw())
    console.print(f"[bold]{m.name}[/] ({total_params(m) / 1e9:.2f} B params, {m.num_layers} layers) on "
                  f"[bold]{c.name}[/] ({groups}), global batch {t.global_batch} x {t.seq_len} tokens, "
                  f"{t.precision}", soft_wrap=True)
    p, cfg = plan.predicted, plan.config
    console.print(f"best: [bold]{cfg.short()}[/], {cfg.num_microbatches} micro-batches, layers per stage "
                  f"{','.join(map(str, cfg.layers_per_stage))}; step [bold]{p.step_time_s:.3f} s[/], "
                  f"{p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%} (of the peaks of the GPUs used), peak "
                  f"{p.peak_reserved_bytes / GIB:.1f} GiB reserved on stage "
                  f"{max(p.memory.stages, key=lambda s: s.reserved).stage}", soft_wrap=True)
    console.print(f"binds: {p.binding}", soft_wrap=True)
    for line in plan.node_groups.explanation:
        console.print(f"  {line}", soft_wrap=True)
    for i, alt in enumerate(plan.alternatives, 2):
        console.print(f"  [dim]#{i}: {alt.config.short()}, step {alt.predicted.step_time_s:.3f} s "
                      f"({alt.predicted.step_time_s / p.step_time_s - 1:+.2%})[/]", soft_wrap=True)
    rej = plan.search.rejected
    console.print(f"searched {result.candidates:,} candidates in {result.seconds:.2f} s: {result.evaluated:,} "
                  f"costed; rejected {rej.get('out_of_memory', 0):,} out of memory, {rej.get('indivisible', 0):,} "
                  f"indivisible, {rej.get('dominated', 0):,} dominated or bounded", soft_wrap=True)


def unsupported(option: str) -> None:
    from planner.errors import InputError
    raise InputError("is not available for clusters with node groups (plan them without it)", field=option)
