"""`meshplan plan`: the plan file, its rank layout, pins, --compare and the no-fit path."""

from __future__ import annotations

import pytest

from planner.plan import Plan
from tests.cli_helpers import run_cli

BASE = ["plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2", "--global-batch", "64",
        "--seq", "2048"]


def test_plan_json_round_trips_and_layout_covers_every_gpu(capsys, tmp_path):
    out = tmp_path / "plan.json"
    r = run_cli(capsys, *BASE, "--top", "4", "--json", "-o", str(out))
    assert r.code == 0, r.err
    plan = Plan.model_validate_json(r.out)
    assert Plan.model_validate_json(out.read_text()) == plan
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    assert plan.feasible and plan.schema_version == 2 and plan.engine.name == "meshplan"
    assert len(plan.alternatives) == 3
    steps = [plan.predicted.step_time_s] + [a.predicted.step_time_s for a in plan.alternatives]
    # the ranking rule: each plan is within 1% of the fastest of those it was picked from (ties go to headroom)
    assert all(steps[i] <= min(steps[i:]) * 1.01 for i in range(len(steps)))
    cfg = plan.config
    gpus = 16
    assert cfg.tp * cfg.pp * cfg.dp == gpus
    assert sorted(e.rank for e in plan.rank_layout) == list(range(gpus))
    assert len({(e.node, e.local_gpu) for e in plan.rank_layout}) == gpus
    assert len({(e.pp, e.dp, e.tp) for e in plan.rank_layout}) == gpus
    assert all(0 <= e.local_gpu < 8 and 0 <= e.node < 2 for e in plan.rank_layout)
    assert sum(cfg.layers_per_stage) == 24
    assert plan.search is not None and plan.search.candidates >= plan.search.evaluated > 0


def test_pins_are_respected(capsys):
    r = run_cli(capsys, *BASE, "--tp", "2", "--zero", "1", "--recompute", "full", "--no-sp", "--json")
    assert r.code == 0, r.err
    plan = Plan.model_validate_json(r.out)
    for c in [plan.config] + [a.config for a in plan.alternatives]:
        assert c.tp == 2 and c.zero == 1 and c.recompute == "full" and not c.sp


def test_rich_report_and_compare(capsys):
    r = run_cli(capsys, *BASE, "--compare", "tp=8,pp=2,recompute=full")
    assert r.code == 0, r.err
    assert "top 5 of" in r.out and "your configuration tp8 pp2" in r.out and "ranks #" in r.out
    assert "rejected" in r.out and "out of memory" in r.out


def test_compare_accepts_a_plan_file(capsys, tmp_path):
    out = tmp_path / "mine.json"
    assert run_cli(capsys, "estimate", *BASE[1:], "--tp", "4", "--pp", "2", "-o", str(out), "--json").code == 0
    r = run_cli(capsys, *BASE, "--compare", str(out))
    assert r.code == 0, r.err
    assert "your configuration tp4 pp2 dp2" in r.out


def test_no_feasible_plan_exits_3_and_says_how_far(capsys):
    r = run_cli(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-40gb", "--global-batch", "8")
    assert r.code == 3
    line = r.err.strip()
    assert len(line.splitlines()) == 1
    assert "closest" in line and "GiB more than" in line and "more GPUs" in line and "--nodes" in line


def test_no_fit_under_pins_suggests_dropping_them(capsys):
    r = run_cli(capsys, "plan", "--model", "gpt3-13b", "--cluster", "dgx-a100-40gb", "--global-batch", "64",
                "--recompute", "none", "--no-zero3", "--tp", "1")
    assert r.code == 3
    assert "drop --recompute" in r.err and "ZeRO-3" in r.err


@pytest.mark.parametrize("args,field", [
    (["--tp", "3"], "--tp"), (["--pp", "25"], "--pp"), (["--dp", "3"], "--dp"), (["--mbs", "5"], "--mbs"),
    (["--zero", "7"], "--zero"), (["--recompute", "x"], "--recompute"), (["--top", "0"], "--top"),
    (["--compare", "tp=8,bogus=1"], "--compare"), (["--compare", "tp=three"], "--compare"),
    (["--compare", "tp=3"], "--tp"), (["--max-tp", "0"], "--max-tp"), (["--profile", "/nonexistent.json"], "--profile"),
])
def test_bad_input(capsys, args, field):
    r = run_cli(capsys, *BASE, *args)
    assert r.code == 2, (r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1 and field in r.err and "Traceback" not in r.err
