"""`meshplan estimate`: the JSON contract and every bad-input path (one line, exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from planner.plan import Plan
from tests.cli_helpers import run_cli

BASE = ["estimate", "--model", "gpt3-6.7b", "--cluster", "dgx-a100-80gb", "--global-batch", "64", "--seq", "2048"]


def override(base: list[str], extra: list[str]) -> list[str]:
    """`base` with the options `extra` sets again removed, then `extra` appended."""
    argv = list(base)
    for i, arg in enumerate(extra[:-1]):
        if arg in argv and not extra[i + 1].startswith("--"):
            j = argv.index(arg)
            del argv[j:j + 2]
    return argv + extra


def test_json_has_the_documented_fields(capsys):
    r = run_cli(capsys, *BASE, "--tp", "2", "--pp", "2", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["feasible"] is True and d["reason"] == ""
    assert d["config"]["tp"] == 2 and d["config"]["pp"] == 2 and d["config"]["dp"] == 2
    p = d["predicted"]
    for key in ("step_time_s", "tokens_per_s", "mfu", "tflops_per_gpu", "peak_memory_bytes", "peak_reserved_bytes"):
        assert p[key] > 0
    assert set(p["time"]) == {"compute", "recompute", "bubble", "tp_comm", "ep_comm", "pp_comm", "dp_comm_exposed", "optimizer",
                              "host"}
    assert len(p["memory"]["stages"]) == 2
    for stage in p["memory"]["stages"]:
        assert stage["total"] == pytest.approx(sum(stage[k] for k in ("params", "grads", "optimizer",
                                                                     "activations", "other")), abs=5)
    assert p["peak_memory_bytes"] == max(s["total"] for s in p["memory"]["stages"])
    assert p["tokens_per_s"] == pytest.approx(64 * 2048 / p["step_time_s"])


def test_infeasible_config_is_an_answer(capsys):
    r = run_cli(capsys, "estimate", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--global-batch", "8",
                "--tp", "8", "--json")
    assert r.code == 0
    d = r.json()
    assert d["feasible"] is False
    assert "stage 0" in d["reason"] and "GiB" in d["reason"]


def test_rich_summary(capsys):
    r = run_cli(capsys, *BASE, "--tp", "4", "--pp", "2", "--recompute", "selective", "--sp")
    assert r.code == 0, r.err
    assert "step time" in r.out and "memory per GPU" in r.out and "binds" in r.out


@pytest.mark.parametrize("args,field", [
    (["--model", "no-such-model"], "--model"),
    (["--model", "/nonexistent/model.yaml"], "--model"),
    (["--cluster", "no-such-cluster"], "--cluster"),
    (["--tp", "3"], "--tp"),                 # 32 heads
    (["--tp", "2", "--pp", "2", "--dp", "3"], "--dp"),
    (["--mbs", "3"], "--mbs"),               # 64 not divisible by dp 8 * 3
    (["--zero", "4"], "--zero"),
    (["--recompute", "sometimes"], "--recompute"),
    (["--schedule", "interleaved", "--pp", "2"], "interleaved"),
    (["--layers-per-stage", "10,10", "--pp", "2"], "layers_per_stage"),
    (["--precision", "int8"], "--precision"),
    (["--seq", "4096"], "--seq"),            # GPT-3 learned positions stop at 2048
    (["--nodes", "0"], "--nodes"),
    (["--sp"], "sp"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, field):
    r = run_cli(capsys, *override(BASE, args))
    assert r.code == 2, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert field in lines[0] and "Traceback" not in r.err


def test_malformed_files(capsys, tmp_path):
    bad_yaml = tmp_path / "model.yaml"
    bad_yaml.write_text("num_layers: [1, 2\nhidden_size: 3")
    r = run_cli(capsys, *BASE[:2], str(bad_yaml), *BASE[3:])
    assert r.code == 2 and "not valid YAML" in r.err and len(r.err.strip().splitlines()) == 1
    bad_json = tmp_path / "cluster.json"
    bad_json.write_text("{\"name\": ")
    argv = list(BASE)
    argv[argv.index("dgx-a100-80gb")] = str(bad_json)
    r = run_cli(capsys, *argv)
    assert r.code == 2 and "not valid JSON" in r.err
    wrong_field = tmp_path / "model2.yaml"
    wrong_field.write_text("num_layers: 4\nhidden_size: 100\nnum_heads: 3\nvocab_size: 10\n")
    r = run_cli(capsys, *BASE[:2], str(wrong_field), *BASE[3:])
    assert r.code == 2 and "divisible by num_heads" in r.err


def test_model_and_cluster_files(capsys, tmp_path):
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"name": "mine", "num_layers": 4, "hidden_size": 256, "num_heads": 4,
                                 "vocab_size": 1000, "max_position_embeddings": 2048}))
    r = run_cli(capsys, *BASE[:2], str(model), *BASE[3:], "--json")
    assert r.code == 0, r.err


def test_plan_file_written_once(capsys, tmp_path):
    out = tmp_path / "plan.json"
    r = run_cli(capsys, *BASE, "--tp", "2", "--pp", "2", "-o", str(out), "--json")
    assert r.code == 0, r.err
    plan = Plan.model_validate_json(out.read_text())
    assert plan.config.tp == 2 and len(plan.rank_layout) == 8
    assert sorted(e.rank for e in plan.rank_layout) == list(range(8))
    assert plan.predicted.step_time_s == pytest.approx(r.json()["predicted"]["step_time_s"])
    again = run_cli(capsys, *BASE, "-o", str(out))
    assert again.code == 2 and "--force" in again.err
    forced = run_cli(capsys, *BASE, "-o", str(out), "--force", "--json")
    assert forced.code == 0


@pytest.mark.parametrize("groups", [3, 0.5, True, "x", [7]])
def test_node_groups_that_are_not_a_list_of_groups(capsys, tmp_path, groups):
    """A cluster's `node_groups` must be a list of node groups: anything else is named in one line (it raised
    a TypeError in the single-group shortcut)."""
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"name": "odd", "node_groups": groups,
                                   "intra_node": {"bandwidth": 3e11}, "inter_node": {"bandwidth": 2.5e10}}))
    argv = list(BASE)
    argv[argv.index("dgx-a100-80gb")] = str(cluster)
    r = run_cli(capsys, *argv)
    assert r.code == 2, (r.out, r.err)
    assert "node_groups" in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
