"""Why the winning plan of a mixture-of-experts model uses expert parallelism, or does not: the winner against the
same configuration at the other expert-parallel degrees, in words (`meshplan plan`'s report and plan file)."""

from __future__ import annotations

from planner.cost.memory import GIB
from planner.cost.model import Core, CostModel
from planner.cost.moe import imbalance
from planner.parallel_dims import ParallelDims
from planner.validate import divisors, expert_shards


def _links(cost: CostModel, core: Core) -> str:
    """Where the EP group's all-to-alls run."""
    group = cost.group(ParallelDims.of(core.cfg, core.order), "ep", core.devices)
    return "inside one node (NVLink)" if group.nodes == 1 else f"across {group.nodes} nodes (NICs)"


def explain(cost: CostModel, winner: Core) -> str | None:
    """One paragraph: what the winner's ep gains or loses in the same configuration against no expert
    parallelism (when it uses some) or against the fastest expert-parallel degree (when it uses none); None for
    a dense model."""
    m, cfg = cost.model, winner.cfg
    if m.moe is None:
        return None
    others = [e for e in divisors(cfg.dp) if e != cfg.ep and expert_shards(m, e, cfg.dp) is None]
    if not others:
        return (f"expert parallelism: ep {cfg.ep} is the only degree that divides dp {cfg.dp} and the "
                f"{m.moe.num_experts} experts")
    same = (lambda e: cfg._replace(ep=e)) if hasattr(cfg, "_replace") else (lambda e: cfg.model_copy(update={"ep": e}))
    rivals = [cost.evaluate_core(same(e), winner.order, winner.devices) for e in others]
    if cfg.ep > 1:            # against no expert parallelism
        rival = next(r for r in rivals if r.cfg.ep == 1)
    else:                     # against the fastest expert-parallel degree (the leanest when none fits)
        fitting = [r for r in rivals if r.feasible]
        rival = min(fitting, key=lambda r: r.step) if fitting else min(rivals, key=lambda r: r.peak_reserved)
    w, r = winner.time, rival.time
    load = lambda c: imbalance(m, cost.training, c.cfg.ep)   # noqa: E731
    parts = []
    for core, t in ((winner, w), (rival, r)):
        if core.cfg.ep > 1:
            parts.append(f"ep {core.cfg.ep}: all-to-all {t['ep_comm']:.2f} s {_links(cost, core)}, the busiest "
                         f"rank computing {load(core):.2f}x the mean routed tokens")
    dp_delta = r["dp_comm_exposed"] - w["dp_comm_exposed"]
    compute_delta = (r["compute"] + r["recompute"]) - (w["compute"] + w["recompute"])
    mem = f"{winner.peak_reserved / GIB:.1f} vs {rival.peak_reserved / GIB:.1f} GiB"
    head = f"expert parallelism: ep {cfg.ep} "
    if not rival.feasible:
        verdict = (f"wins: ep {rival.cfg.ep} in the same configuration does not fit ({rival.peak_reserved / GIB:.1f} "
                   f"GiB against a {cost.budget_bytes / GIB:.1f} GiB budget; expert states shrink with ep)")
    else:
        gain = rival.step / winner.step - 1
        how = (f"is {gain:.1%} slower" if gain > 0 else
               f"ties within 1% ({-gain:.1%} faster) but reserves more memory")
        verdict = (f"{'wins' if cfg.ep > 1 else 'is chosen (no EP)'}: ep {rival.cfg.ep} in the same configuration "
                   f"{how} ({rival.step:.2f} vs {winner.step:.2f} s): exposed DP communication "
                   f"{dp_delta:+.2f} s, compute {compute_delta:+.2f} s, EP all-to-all "
                   f"{r['ep_comm'] - w['ep_comm']:+.2f} s; memory {mem}")
    return head + verdict + ". " + "; ".join(parts) + "."
