"""--memory-headroom: feasibility is judged against the usable memory less the headroom, the figure is in the
JSON and the report, and the search keeps it free."""

from __future__ import annotations

import pytest

from planner.cost.model import MEMORY_HEADROOM
from tests.cli_helpers import run_cli

BASE = ["--model", "gpt3-13b", "--cluster", "dgx-a100-80gb", "--nodes", "1", "--global-batch", "32", "--seq",
        "2048"]
CONFIG = ["--tp", "8", "--pp", "1", "--mbs", "1", "--recompute", "none"]


def test_feasibility_is_judged_against_the_budget(capsys):
    plain = run_cli(capsys, "estimate", *BASE, *CONFIG, "--memory-headroom", "0", "--json").json()
    reserved, usable = plain["predicted"]["peak_reserved_bytes"], plain["predicted"]["memory"]["usable_bytes"]
    share = reserved / usable
    assert 0.1 < share < 0.9, share
    for headroom in (0.0, round(1 - share - 0.01, 3), round(1 - share + 0.01, 3), 0.9):
        pred = run_cli(capsys, "estimate", *BASE, *CONFIG, "--memory-headroom", str(headroom), "--json").json()
        memory = pred["predicted"]["memory"]
        assert memory["headroom"] == headroom
        assert memory["budget_bytes"] == round(usable * (1 - headroom))
        assert pred["predicted"]["peak_reserved_bytes"] == reserved        # the prediction itself is unchanged
        assert pred["feasible"] == (reserved <= usable * (1 - headroom)), headroom
        if not pred["feasible"]:
            assert "GiB budget" in pred["reason"] and f"{headroom:.0%} headroom" in pred["reason"]


def test_the_default_headroom_is_documented_and_shown(capsys):
    assert MEMORY_HEADROOM == 0.10
    pred = run_cli(capsys, "estimate", *BASE, *CONFIG, "--json").json()
    assert pred["predicted"]["memory"]["headroom"] == 0.10
    text = run_cli(capsys, "estimate", *BASE, *CONFIG).out
    assert "10% headroom" in text and "GiB budget" in text


@pytest.mark.parametrize("headroom", ["0.3", "0.45"])
def test_plans_keep_the_headroom_free(capsys, headroom):
    plan = run_cli(capsys, "plan", *BASE, "--memory-headroom", headroom, "--top", "5", "--json").json()
    for pred in [plan] + plan["alternatives"]:
        memory = pred["predicted"]["memory"]
        assert pred["feasible"]
        assert pred["predicted"]["peak_reserved_bytes"] <= memory["usable_bytes"] * (1 - float(headroom))


@pytest.mark.parametrize("value", ["-0.1", "0.95", "nan", "1"])
def test_headroom_outside_its_range_is_refused(capsys, value):
    r = run_cli(capsys, "plan", *BASE, "--memory-headroom", value)
    assert r.code == 2 and r.err.strip().splitlines() == [r.err.strip()]
    assert "--memory-headroom: must be" in r.err and "0..0.9" in r.err
