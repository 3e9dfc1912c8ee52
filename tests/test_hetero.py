"""Clusters of node groups: specs (backward compatible, checked), links and topology against hand
computation, the heterogeneous cost against the homogeneous model where both apply, the search and the CLI."""

from __future__ import annotations

import itertools
import math

import pytest
import yaml

from planner.cost.model import CostModel
from planner.hetero.cost import HeteroCost
from planner.hetero.groups import node_groups
from planner.hetero.search import search_hetero
from planner.loaders import CLUSTER_DIR, cluster_names, load_cluster
from planner.presets import PRESETS
from planner.search.space import Candidate
from planner.specs import ClusterSpec, TrainingSpec
from tests.cli_helpers import run_cli

LLAMA70 = PRESETS["llama3-70b"]
CONFIGS = [Candidate(8, 2, 1, 1, 1, 0, "full", True, "1f1b"), Candidate(4, 2, 4, 1, 1, 1, "selective", True, "gpipe"),
           Candidate(8, 4, 1, 1, 2, 0, "none", False, "1f1b"), Candidate(2, 4, 4, 1, 1, 3, "full", False, "1f1b")]


def _spec(name: str) -> dict:
    return yaml.safe_load((CLUSTER_DIR / f"{name}.yaml").read_text())


def split_in_two(name: str, first_nodes: int, total_nodes: int, **extra) -> ClusterSpec:
    """A one-group cluster written as two node groups of the same nodes (the links default to the NICs)."""
    data = _spec(name)
    group = data.pop("nodes")
    data["node_groups"] = [{**group, "name": "a", "count": first_nodes},
                           {**group, "name": "b", "count": total_nodes - first_nodes}]
    data.update(extra)
    return ClusterSpec.model_validate(data)


def test_every_builtin_cluster_loads_and_one_group_equals_nodes():
    for name in cluster_names():
        load_cluster(name)
    data = _spec("dgx-h100")
    group = data.pop("nodes")
    group.update(intra_node=data.pop("intra_node"), inter_node=data.pop("inter_node"))
    assert ClusterSpec.model_validate({**data, "node_groups": [group]}) == load_cluster("dgx-h100")


def test_builtin_examples():
    mixed = load_cluster("mixed-h100-a100")
    assert [(g.name, g.nodes, g.gpu_type) for g in node_groups(mixed)] == [
        ("h100", 4, "h100-sxm5-80gb"), ("a100", 8, "a100-sxm4-80gb")]
    assert mixed.world_size == 96 and mixed.heterogeneous
    islands = load_cluster("two-islands")
    assert [g.gpus for g in node_groups(islands)] == [64, 64]
    # each group is the built-in single-type cluster's device and links (the files cannot drift apart)
    for group, source in zip(node_groups(mixed), ("dgx-h100", "dgx-a100-80gb")):
        single = load_cluster(source)
        assert group.cluster.gpu == single.gpu
        assert (group.cluster.intra_node, group.cluster.inter_node, group.cluster.nics_per_node) == (
            single.intra_node, single.inter_node, single.nics_per_node)
    h100 = load_cluster("dgx-h100")
    assert all(g.cluster.gpu == h100.gpu and g.cluster.inter_node == h100.inter_node for g in node_groups(islands))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["node_groups"][0].update(gpu_type="b200"), "node_groups 'h100'.gpu_type 'b200'"),
    (lambda d: d["node_groups"][1].update(name="h100"), "names must be unique"),
    (lambda d: d.update(group_links=[{"between": ["h100", "x"], "bandwidth": 1e9, "latency": 0}]), "names 'x'"),
    (lambda d: d.update(nodes={"count": 1, "gpu_type": "h100-sxm5-80gb"}), "either nodes or node_groups"),
    (lambda d: d["node_groups"][0].pop("intra_node"), "intra_node is required"),
])
def test_bad_node_groups_are_one_line_errors(tmp_path, capsys, edit, message):
    data = _spec("mixed-h100-a100")
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    r = run_cli(capsys, "plan", "-m", "llama3-8b", "-c", path, "-b", "8")
    assert r.code == 2 and message in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


def test_homogeneous_commands_refuse_node_groups(capsys):
    r = run_cli(capsys, "estimate", "-m", "llama3-8b", "-c", "mixed-h100-a100", "-b", "96", "--tp", "8")
    assert r.code == 2 and "node groups" in r.err and len(r.err.strip().splitlines()) == 1
    r = run_cli(capsys, "plan", "-m", "llama3-8b", "-c", "mixed-h100-a100", "-b", "96", "--nodes", "3")
    assert r.code == 2 and "--nodes" in r.err
    r = run_cli(capsys, "plan", "-m", "llama3-8b", "-c", "mixed-h100-a100", "-b", "96", "--compare", "tp=8")
    assert r.code == 2 and "--compare" in r.err


def test_one_group_hetero_cost_is_the_homogeneous_model():
    training = TrainingSpec(global_batch=64, seq_len=4096)
    cluster = load_cluster("dgx-h100", nodes=4)
    homogeneous, hetero = CostModel(LLAMA70, cluster, training), HeteroCost(LLAMA70, cluster, training)
    for cand in CONFIGS:
        core = homogeneous.evaluate_core(cand)
        mine = hetero.evaluate(cand, (0,) * cand.pp, core.chunks)
        assert mine.step == core.step and mine.time == core.time
        assert max(mine.reserved) == core.peak_reserved and mine.feasible == core.feasible


@pytest.mark.parametrize("dense", [0, 3])
def test_one_group_hetero_cost_is_the_homogeneous_model_with_experts(dense):
    # Mixtral with its routed experts sharded over ep ranks of a stage's DP group (all-to-alls, expert-DP
    # gradient reduction and expert optimizer states included); with its first `dense` layers dense, each stage
    # priced with its own layers in both models
    base = PRESETS["mixtral-8x7b"]
    mixtral = base.model_copy(update={"moe": base.moe.model_copy(update={"first_dense_layers": dense})})
    training = TrainingSpec(global_batch=64, seq_len=4096)
    cluster = load_cluster("dgx-h100", nodes=4)
    homogeneous, hetero = CostModel(mixtral, cluster, training), HeteroCost(mixtral, cluster, training)
    for cand in (Candidate(4, 2, 4, 1, 1, 1, "full", True, "1f1b", ep=4), Candidate(2, 4, 4, 1, 1, 3, "full", True,
                                                                                  "1f1b", ep=2)):
        core = homogeneous.evaluate_core(cand)
        mine = hetero.evaluate(cand, (0,) * cand.pp, core.chunks)
        assert core.time["ep_comm"] > 0
        assert mine.step == core.step and mine.time == core.time
        assert max(mine.reserved) == core.peak_reserved
        assert [st.total for st in mine.stages] == [st.total for st in core.stages]
        if dense:
            assert core.stages[0].params < core.stages[-1].params       # stage 0 holds the dense layers


def test_two_groups_of_the_same_nodes_cost_as_one():
    # the link between groups defaults to the NICs: a pipeline hop or the tied-embedding sync across the groups
    # costs what it costs across two nodes of one group
    training = TrainingSpec(global_batch=64, seq_len=4096)
    one = CostModel(LLAMA70, load_cluster("dgx-h100", nodes=4), training)
    two = HeteroCost(LLAMA70, split_in_two("dgx-h100", 2, 4), training)
    for cand in CONFIGS:
        core = one.evaluate_core(cand)
        groups = two.rank_order(cand)
        mine = two.evaluate(cand, groups, core.chunks)
        assert math.isclose(mine.step, core.step, rel_tol=1e-12), cand
        assert max(mine.reserved) == core.peak_reserved


def test_group_link_and_oversubscription_by_hand():
    link = {"between": ["a", "b"], "bandwidth": 12.5e9, "latency": 25e-6, "oversubscription": 2.0}
    cluster = split_in_two("dgx-h100", 1, 2, group_links=[link])
    hc = HeteroCost(LLAMA70, cluster, TrainingSpec(global_batch=8, seq_len=4096))
    cand = Candidate(8, 2, 1, 1, 1, 0, "full", False, "1f1b")
    nbytes = hc.costs[0]._act_msg(cand)          # one micro-batch's activation (the residual stream's dtype)
    # 8 GPUs of a node send at once over 12.5 GB/s halved by the oversubscription
    assert math.isclose(hc.hop_seconds(cand, hc.devices(cand, (0, 1)), 0), 25e-6 + nbytes * 8 / 6.25e9)


def test_leaf_spine_topology_by_hand():
    # 4 nodes, 2 per leaf, uplinks oversubscribed 4:1: inside a leaf the NICs' 400 GB/s per node, across leaves
    # a quarter; a group spanning both leaves has its NICs cut to a quarter, a group inside one leaf does not
    topo = {"kind": "leaf_spine", "nodes_per_leaf": 2, "oversubscription": 4.0}
    across = node_groups(split_in_two("dgx-h100", 3, 4, topology=topo))
    assert across[0].cluster.inter_node.bandwidth == 50e9 / 4
    inside = node_groups(split_in_two("dgx-h100", 2, 4, topology=topo))
    assert inside[0].cluster.inter_node.bandwidth == 50e9 and inside[1].cluster.inter_node.bandwidth == 50e9
    hc = HeteroCost(LLAMA70, split_in_two("dgx-h100", 2, 4, topology=topo), TrainingSpec(global_batch=8, seq_len=64))
    assert hc.links.link(0, 1).bandwidth == 8 * 50e9 / 4


def test_measured_link_matrix_wins():
    cluster = split_in_two("dgx-h100", 1, 2)
    n = cluster.world_size
    bw = [[0.0 if i == j else (1e9 if (i < 8) != (j < 8) else 100e9) for j in range(n)] for i in range(n)]
    lat = [[0.0 if i == j else 1e-3 for j in range(n)] for i in range(n)]
    measured = ClusterSpec.model_validate({**cluster.model_dump(), "link_matrix": {"world_size": n, "bandwidth": bw,
                                                                                  "latency": lat}})
    hc = HeteroCost(LLAMA70, measured, TrainingSpec(global_batch=8, seq_len=4096))
    cand = Candidate(8, 2, 1, 1, 1, 0, "full", False, "1f1b")
    nbytes = hc.costs[0]._act_msg(cand)
    assert math.isclose(hc.hop_seconds(cand, hc.devices(cand, (0, 1)), 0), 1e-3 + nbytes / 1e9)
    assert node_groups(measured)[0].cluster.link_matrix.bandwidth[0][1] == 100e9


def test_mixed_plan_uses_both_types_and_beats_either_part():
    result = search_hetero(LLAMA70, load_cluster("mixed-h100-a100"), TrainingSpec(global_batch=256, seq_len=4096),
                           top_k=1)
    best = result.top[0]
    assert set(best.groups) == {0, 1} and best.feasible
    h100 = [n for k, n in zip(best.groups, best.layers) if k == 0]
    a100 = [n for k, n in zip(best.groups, best.layers) if k == 1]
    assert min(h100) > max(a100)                  # the faster GPUs hold more layers
    assert all(p.step is not None and p.step > 1.2 * best.step for p in result.parts)
    assert result.naive.step > best.step


def test_two_islands_keep_dp_and_tp_inside_and_pipeline_across(capsys):
    """Llama-3-70B on two 8-node pods joined by 12.5 GB/s per node: DP and TP stay inside a pod and the
    pipeline crosses the slow link once. With asynchronous sends every micro-batch's activation and gradient
    still cross each hop, so a slow hop lengthens the steady-state loop of the stages beside it (the schedule
    simulation's slope, tests/test_pipeline_schedule.py); crossing twice (pod-a, pod-b, pod-b, pod-a) puts two
    slow hops in the whole pipeline's loop and is slower (18.35 s of pipeline against 18.06 s in the
    simulation, 18.41 s against 18.12 s per step in the model). A model that charges every hop the slowest
    hop's delay prices one and two crossings alike and may return either."""
    r = run_cli(capsys, "plan", "-m", "llama3-70b", "-c", "two-islands", "-b", "512", "--seq", "4096", "--top", "1",
                "--json")
    assert r.code == 0
    plan = r.json()
    layout = plan["rank_layout"]
    assert {row["gpu_type"] for row in layout} == {"h100-sxm5-80gb"}
    by_stage: dict[int, set] = {}
    for row in layout:
        by_stage.setdefault(row["pp"], set()).add(row["node_group"])
    assert all(len(groups) == 1 for groups in by_stage.values())          # DP and TP inside one island
    order = [next(iter(by_stage[s])) for s in sorted(by_stage)]
    assert sum(a != b for a, b in zip(order, order[1:])) == 1              # the pipeline crosses the link once
    text = " ".join(plan["node_groups"]["explanation"])
    assert "data parallelism inside a group" in text and "only pipeline transfers cross groups" in text
    assert "one fabric at its slowest group link" in text


def test_two_islands_crossing_twice_costs_its_second_slow_hop():
    """The two-islands plan's configuration with its stages in pod order (one slow hop) and folded back
    (pod-a, pod-b, pod-b, pod-a: two slow hops), same layers: the second costs more, all of it pipeline
    transfers, and a third crossing (alternating pods) more still."""
    hc = HeteroCost(PRESETS["llama3-70b"], load_cluster("two-islands"), TrainingSpec(global_batch=512, seq_len=4096))
    cand = Candidate(4, 4, 8, 1, 1, 1, "none", True, "1f1b")
    layers = [20, 20, 20, 20]
    once, twice, thrice = (hc.evaluate(cand, g, layers) for g in ((0, 0, 1, 1), (0, 1, 1, 0), (0, 1, 0, 1)))
    assert once.p2p == twice.p2p == thrice.p2p                     # the same slowest hop
    assert once.step < twice.step < thrice.step
    assert twice.step - once.step == pytest.approx(twice.time["pp_comm"] - once.time["pp_comm"], rel=1e-6)
    for core in (once, twice, thrice):
        assert {k: v for k, v in core.time.items() if k not in ("pp_comm", "bubble")} == pytest.approx(
            {k: v for k, v in once.time.items() if k not in ("pp_comm", "bubble")})


def test_search_prunes_nothing_better_than_its_answer():
    """Against every candidate costed with its best contiguous assignment: the bound never exceeds the step,
    and the search's answer is at least as fast as the fastest of them (the ILP may improve on it)."""
    from collections import Counter

    from planner.hetero.assign import contiguous
    from planner.hetero.search import enumerate_hetero, time_bound
    from planner.search.space import Constraints
    mixed = load_cluster("mixed-h100-a100")
    small = mixed.model_copy(update={"node_groups": [g.model_copy(update={"count": 1}) for g in mixed.node_groups]})
    training = TrainingSpec(global_batch=16, seq_len=2048)
    model = PRESETS["llama3-8b"]
    hc = HeteroCost(model, small, training)
    best = math.inf
    for cand in enumerate_hetero(hc, Constraints(), Counter()):
        a = contiguous(hc.problem(cand))
        if a is None:
            continue
        core = hc.evaluate(cand, a.groups, a.layers)
        assert time_bound(hc, cand) <= core.step * (1 + 1e-9), cand
        if core.feasible:
            best = min(best, core.step)
    found = search_hetero(model, small, training, top_k=1, baselines=False)
    assert found.top[0].step <= best * (1 + 1e-12)


def _compositions(total: int, parts: int):
    """Every split of `total` blocks into `parts` stages of at least one."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        yield [b - a for a, b in zip((0,) + cuts, cuts + (total,))]


def test_a_group_that_only_hurts_is_left_idle():
    """Two one-node groups of two CPUs, the second three times slower and behind a 2 MB/s link: brute force over
    every subset of groups, configuration, stage-to-group assignment and layer split (each costed in full) says
    the fast group alone wins; the search returns that plan and says what using the slow group costs."""
    from collections import Counter

    from planner.hetero.report import explain
    from planner.hetero.search import enumerate_hetero
    from planner.loaders import load_model
    from planner.search.space import Constraints
    from tests.conftest import DATA
    data = yaml.safe_load((DATA / "clusters" / "cpu-two-groups.yaml").read_text())
    data["group_links"] = [{"between": ["fast", "slow"], "bandwidth": 2e6, "latency": 5e-3, "efficiency": 1.0}]
    cluster = ClusterSpec.model_validate(data)
    model = load_model(str(DATA / "clusters" / "gpt-tiny-8.yaml"))
    training = TrainingSpec(global_batch=8, seq_len=32, precision="fp32")

    hc = HeteroCost(model, cluster, training)
    brute: dict[tuple, float] = {}
    for used in [(0, 1), (0,), (1,)]:
        view = hc.using(used)
        for cand in enumerate_hetero(view, Constraints(), Counter()):
            slots = [k for k, n in enumerate(view.capacity(cand.tp, cand.dp)) for _ in range(n)]
            for groups in set(itertools.permutations(slots)):
                for layers in _compositions(model.num_layers, cand.pp):
                    core = hc.evaluate(cand, groups, layers)
                    if core.feasible:
                        brute[used] = min(brute.get(used, math.inf), core.step)
    assert min(brute, key=brute.get) == (0,) and brute[(0, 1)] > 1.3 * brute[(0,)]

    result = search_hetero(model, cluster, training, top_k=3)
    best = result.top[0]
    assert best.used == (0,) and set(best.groups) == {0}
    assert best.step <= brute[(0,)] * 1.01          # the layer split is the stage objective's (0.5% off here)
    assert best.step < brute[(0, 1)]                # faster than any plan on both groups
    every = result.every_group
    assert every.used == (0, 1) and every.step >= brute[(0, 1)] * (1 - 1e-12)
    lines = explain(result.cost, result)
    # first the warning that the fast group alone, as the homogeneous search plans it, is faster: its GPipe layer
    # split minimises the whole step (GPipe's forward and backward maxima apart, the optimizer after the last
    # backward), the node-group split the stage objective (0.5% off here)
    assert lines[0].startswith("warning: fast alone") and "layer split" in lines[0]
    assert lines[1].startswith("the slow group is left idle: using it costs more than it adds")
    assert f"{every.step / best.step - 1:+.1%}" in lines[1]
