"""`meshplan calibrate` on real measurements: 12 `meshplan run` reports of this project's 2-core CI-class CPU
(gpt-tiny, llama-tiny and a 13M-parameter GPT; tp, pp and dp 2, ZeRO 0-3, recomputation, SP; measured by
scripts/accuracy_cpu.py), starting from any of three `profile cluster` files of the same machine taken at
different times (profile-c also carries the optimizer's host seconds per plain and per DTensor parameter tensor,
and collectives timed over 15 calls). Each run predicted by a fit without it must land within 10% on average
from every profile: the choice of parameters must not hinge on the profile's noise (it once gave 8% from one and
19% from the other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "tests" / "data" / "cpu_runs"


@pytest.mark.parametrize("profile", ["profile-a.yaml", "profile-b.yaml", "profile-c.yaml"])
def test_left_out_runs_are_predicted_within_ten_percent_from_every_profile(tmp_path, profile):
    reports = sorted(RUNS.glob("*.json"))
    assert len(reports) == 12
    out = tmp_path / "calibrated.yaml"
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "calibrate", "-c", str(RUNS / profile), "--runs",
                           *map(str, reports), "-o", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    rec = yaml.safe_load(out.read_text())["calibration"]
    assert rec["error_before_pct"] > 20                  # the profiled spec alone misses by a quarter or more
    assert rec["loo_error_pct"] < 10, rec["loo_error_pct"]
    assert rec["error_after_pct"] <= rec["loo_error_pct"]
    fitted = {p["path"] for p in rec["parameters"]}
    # gloo's per-collective cost in a busy run (ms, against 25 us in the engine file) is what both need
    assert "engine.host.per_collective_s" in fitted
