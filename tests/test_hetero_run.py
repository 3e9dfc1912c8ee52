"""`meshplan run` honours a node-group plan: stages placed off rank order and uneven layer counts (on CPU the
devices are alike, so the placement and the layer split are what runs), the loss equal to a plain PyTorch
single-process run of the same model and batch."""

from __future__ import annotations

import json

from tests.cli_helpers import run_cli
from tests.conftest import DATA
from tests.runtime_helpers import model_spec, reference_losses, relative_error
from tests.test_runtime_cli import meshplan

CLUSTER = DATA / "clusters" / "cpu-two-groups.yaml"
MODEL = DATA / "clusters" / "gpt-tiny-8.yaml"
STEPS = 3


def test_node_group_plan_runs_and_matches_single_process(tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    r = run_cli(capsys, "plan", "-m", MODEL, "-c", CLUSTER, "-b", 8, "--seq", 32, "--precision", "fp32",
                "--pp", 2, "--dp", 2, "--tp", 1, "--top", 1, "-o", plan_file)
    assert r.code == 0, r.err
    plan = json.loads(plan_file.read_text())
    cfg = plan["config"]
    # the slow group (listed second) takes the short first stage, the fast one the rest: stage 0 runs on
    # devices 2-3, off rank order, and the stages hold different layer counts
    assert cfg["layers_per_stage"][0] < cfg["layers_per_stage"][1] and sum(cfg["layers_per_stage"]) == 8
    assert cfg["placement"] == [2, 3, 0, 1]
    rows = {row["rank"]: row for row in plan["rank_layout"]}
    assert (rows[0]["node_group"], rows[0]["gpu_type"], rows[0]["node"]) == ("slow", "cpu-slow", 1)
    assert (rows[2]["node_group"], rows[2]["gpu_type"], rows[2]["node"]) == ("fast", "cpu", 0)

    report_file = tmp_path / "run.json"
    proc = meshplan("run", plan_file, "--steps", STEPS, "--nnodes", 1, "--nproc-per-node", 4, "--report", report_file,
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    want = reference_losses(model_spec("gpt-tiny", {"name": "gpt-tiny-8", "num_layers": 8}), 8, 32, STEPS)
    assert relative_error(report["losses"], want) < 1e-5, (report["losses"], want)


def test_plan_that_leaves_the_first_group_idle_runs_on_the_groups_it_uses(tmp_path, capsys):
    """The slow group listed first and behind a 2 MB/s link: the plan leaves it idle and is written for the
    fast group alone (its devices numbered from 0), which `meshplan run` launches and which matches the
    single-process reference."""
    import yaml
    data = yaml.safe_load(CLUSTER.read_text())
    data["node_groups"] = data["node_groups"][::-1]
    data["group_links"] = [{"between": ["fast", "slow"], "bandwidth": 2e6, "latency": 5e-3, "efficiency": 1.0}]
    cluster = tmp_path / "slow-first.yaml"
    cluster.write_text(yaml.safe_dump(data))
    plan_file = tmp_path / "plan.json"
    r = run_cli(capsys, "plan", "-m", MODEL, "-c", cluster, "-b", 8, "--seq", 32, "--precision", "fp32",
                "--top", 1, "-o", plan_file)
    assert r.code == 0, r.err
    plan = json.loads(plan_file.read_text())
    assert [g["name"] for g in plan["cluster"]["node_groups"]] == ["fast"]
    assert {row["node_group"] for row in plan["rank_layout"]} == {"fast"}
    # after the warning that the fast group alone, as the homogeneous search plans it (its GPipe layer split by
    # the whole step), is faster still (test_hetero.test_a_group_that_only_hurts_is_left_idle)
    assert plan["node_groups"]["explanation"][1].startswith("the slow group is left idle")
    world = len(plan["rank_layout"])
    report_file = tmp_path / "run.json"
    proc = meshplan("run", plan_file, "--steps", STEPS, "--nnodes", 1, "--nproc-per-node", world, "--report",
                    report_file, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    want = reference_losses(model_spec("gpt-tiny", {"name": "gpt-tiny-8", "num_layers": 8}), 8, 32, STEPS)
    assert relative_error(report["losses"], want) < 1e-5, (report["losses"], want)
