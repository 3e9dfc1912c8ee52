"""runtime/moe.py: the MoE MLP against a per-token loop, and expert parallelism (all-to-all over EP groups of 2
inside data parallelism 4, on gloo) against one process over the whole batch; `meshplan run`'s runtime with expert
parallelism against the single-process reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime.moe import MoEMLP, expert_major

ROOT = Path(__file__).resolve().parents[1]


def test_moe_mlp_matches_a_per_token_loop():
    """y_t = sum over its top-k experts of w * down(silu(gate x) * up x) + the shared expert, with w the softmax
    probabilities of the chosen experts renormalised to sum to one."""
    torch.manual_seed(0)
    m = MoEMLP(8, 12, 4, 2, shared_ffn=6)
    x = torch.randn(2, 5, 8)
    y = m(x)
    for b in range(2):
        for t in range(5):
            v = x[b, t]
            p = (m.router.weight @ v).softmax(-1)
            w, e = p.topk(2)
            w = w / w.sum()
            ex = m.experts
            want = sum(w[j] * ((F.silu(v @ ex.gate[e[j]]) * (v @ ex.up[e[j]])) @ ex.down[e[j]]) for j in range(2))
            s = m.shared
            want = want + s.down.weight @ (F.silu(s.gate.weight @ v) * (s.up.weight @ v))
            assert torch.allclose(y[b, t], want, rtol=1e-5, atol=1e-6)


def test_expert_major_order_is_the_block_by_block_permutation():
    """Against the permutation written out block by block: rows grouped by source then expert (table[s, e] of
    them) regrouped by expert then source, empty blocks included."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        sources, experts = torch.randint(1, 5, (2,), generator=gen).tolist()
        table = torch.randint(0, 4, (sources, experts), generator=gen)
        start = {}
        at = 0
        for s in range(sources):
            for e in range(experts):
                start[s, e], at = at, at + int(table[s, e])
        want = [start[s, e] + i for e in range(experts) for s in range(sources) for i in range(int(table[s, e]))]
        assert expert_major(table, at).tolist() == want


def test_expert_parallel_matches_single_process(tmp_path):
    """Outputs and every gradient (experts reduced over the expert-data-parallel group, the router and shared
    expert over all ranks) within 1e-5 of one process, with balanced and skewed routing; without the expert
    gradients' reduction they are far off (the check can fail). In the same launch: the runtime's DeviceMesh
    groups of pp2 dp2(ep2), dp2(ep2) tp2 and dp4(ep2) layouts, on moved processes, are the planner's
    (planner/parallel_dims.py) in every dimension."""
    out = tmp_path / "moe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           f"--log-dir={tmp_path / 'logs'}", str(ROOT / "tests" / "moe_worker.py"), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(out.read_text())
    # the runtime's device mesh: every dimension of every layout on every process is the planner's group
    assert results.pop("mesh groups") == {"checks": 4 * 4 * 5, "mismatches": 0}
    assert len(results) == 5
    for name, errors in results.items():
        for key, err in errors.items():
            if key == "unreduced_expert_grad":
                assert err > 1e-2, name
            else:
                assert err < 1e-5, (name, key, err)


# `meshplan run`'s runtime with expert parallelism, one torchrun launch of 4 processes: ZeRO 0, 1 and 3, an
# expert-data-parallel group of 2 (ep 2 in dp 4) and of 1 (ep 4 in dp 4; ep 2 in dp 2 with pp 2); tensor (and
# sequence) parallelism 2 with ep 2 in dp 2 (ZeRO 0 and 3), with pp 2, and with dp 2 without ep (ZeRO 1). SGD
# layouts because AdamW's update barely depends on the gradients' scale (a missing 1/ep on the expert gradients is
# 2-3.5e-5 off with SGD at lr 0.1-0.5, beyond the tolerance).
EP_LAYOUTS = [
    {"name": "ep2-dp4-zero0-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1, "config": {"dp": 4, "ep": 2}},
    {"name": "ep2-dp4-zero1", "model": "moe-tiny", "config": {"dp": 4, "ep": 2, "zero": 1}},
    {"name": "ep4-dp4-zero3-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1,
     "config": {"dp": 4, "ep": 4, "zero": 3}},
    {"name": "ep2-dp2-pp2-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1,
     "config": {"dp": 2, "ep": 2, "pp": 2}},
    {"name": "tp2-ep2-dp2-zero0-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1,
     "config": {"tp": 2, "sp": True, "dp": 2, "ep": 2}},
    {"name": "tp2-ep2-dp2-zero3", "model": "moe-tiny", "config": {"tp": 2, "sp": True, "dp": 2, "ep": 2, "zero": 3}},
    {"name": "tp2-pp2-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1,
     "config": {"tp": 2, "sp": True, "pp": 2}},
    {"name": "tp2-dp2-zero1-sgd", "model": "moe-tiny", "optimizer": "sgd", "lr": 0.1,
     "config": {"tp": 2, "sp": True, "dp": 2, "zero": 1}},
]
# Checkpoints of expert-parallel runs, in the same launch: saved at step 2 of 4, then a run built afresh resumes
# from it (ep 2 in dp 4, ZeRO 1; tp 2 ep 2 dp 2, ZeRO 3).
RESUME_LAYOUTS = [
    {"name": "ep2-dp4-zero1-saved", "model": "moe-tiny", "config": {"dp": 4, "ep": 2, "zero": 1},
     "checkpoint_every": 2},
    {"name": "ep2-dp4-zero1-resumed", "model": "moe-tiny", "config": {"dp": 4, "ep": 2, "zero": 1},
     "resume": ["ep2-dp4-zero1-saved", 2]},
    {"name": "tp2-ep2-dp2-zero3-saved", "model": "moe-tiny", "config": {"tp": 2, "sp": True, "dp": 2, "ep": 2,
                                                                         "zero": 3}, "checkpoint_every": 2},
    {"name": "tp2-ep2-dp2-zero3-resumed", "model": "moe-tiny", "config": {"tp": 2, "sp": True, "dp": 2, "ep": 2,
                                                                           "zero": 3},
     "resume": ["tp2-ep2-dp2-zero3-saved", 2]},
]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    from tests.runtime_helpers import run_layouts
    return run_layouts(EP_LAYOUTS + RESUME_LAYOUTS, 4, tmp_path_factory.mktemp("ep-runs"), timeout=1500)


def test_expert_parallel_runs_match_the_single_process_reference(ep_runs):
    """Every layout's loss curve (4 steps) within 1e-5 relative of tests/reference_model.py's single process,
    which computes every expert on every token and weighs them with a dense gate matrix."""
    from tests.runtime_helpers import model_spec, reference_losses, relative_error
    spec = model_spec("moe-tiny")
    for lay in EP_LAYOUTS + RESUME_LAYOUTS[::2]:
        want = reference_losses(spec, 8, 32, 4, lr=lay.get("lr", 1e-3), optimizer=lay.get("optimizer", "adamw"))
        got = ep_runs[lay["name"]]["losses"]
        assert len(got) == 4 and relative_error(got, want) < 1e-5, (lay["name"], got, want)


def test_expert_parallel_runs_resume_exactly(ep_runs):
    """A run rebuilt from scratch and resumed from the checkpoint of step 2 gives the uninterrupted loss curve, bit
    for bit (expert weights and their optimizer states restored on the EP rank that holds them)."""
    for saved, resumed in zip(RESUME_LAYOUTS[::2], RESUME_LAYOUTS[1::2]):
        assert ep_runs[resumed["name"]]["losses"] == ep_runs[saved["name"]]["losses"], resumed["name"]


def test_plan_with_ep_runs_end_to_end(tmp_path):
    """`meshplan plan --tp 2 --ep 2` for moe-tiny on 4 CPU processes (the search picks sequence parallelism, which MoE
    under tp needs), then `meshplan run` of that plan: the run honours the plan's tp and ep (the report says so) and
    its losses are the single-process reference's."""
    from tests.runtime_helpers import PYTHON, model_spec, reference_losses, relative_error

    def meshplan(*args):
        return subprocess.run([PYTHON, "-m", "planner.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=600, cwd=ROOT)

    plan = tmp_path / "plan.json"
    proc = meshplan("plan", "-m", "moe-tiny", "--cluster", "cpu-local", "--nodes", 1, "--gpus-per-node", 4,
                    "-b", 8, "-s", 32, "--precision", "fp32", "--ep", 2, "--tp", 2, "-o", plan)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(plan.read_text())["config"]
    assert (cfg["tp"], cfg["ep"], cfg["sp"]) == (2, 2, True)
    proc = meshplan("run", plan, "--steps", 3, "--report", tmp_path / "run.json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "run.json").read_text())
    assert "ep2" in report["config"] and "tp2" in report["config"] and "ep2" in proc.stdout
    assert report["plan"]["config"]["ep"] == 2 and report["plan"]["config"]["tp"] == 2
    want = reference_losses(model_spec("moe-tiny"), 8, 32, 3)
    assert relative_error(report["losses"], want) < 1e-5, (report["losses"], want)


def test_what_the_runtime_refuses_for_moe_models(tmp_path):
    """One line naming the field (InputError, exit 2) before anything launches: routers and capacity factors the
    runtime does not build. Tensor parallelism and checkpoints under expert parallelism are accepted."""
    import argparse

    from runtime.checks import check_run, unsupported
    from tests.runtime_helpers import make_test_plan, model_spec

    args = argparse.Namespace(steps=2, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ck"), resume=False,
                              force=False, data=None, data_dtype="uint16", seed=0, lr=1e-3)
    check_run(make_test_plan("moe-tiny", dp=4, ep=2), 4, args)
    check_run(make_test_plan("moe-tiny", tp=2, sp=True, dp=2, ep=2), 4, args)
    moe = model_spec("moe-tiny").moe
    for change, field in (({"router": "sigmoid"}, "moe.router"), ({"capacity_factor": 1.25}, "moe.capacity_factor")):
        spec = model_spec("moe-tiny", {"moe": moe.model_copy(update=change)})
        assert field in unsupported(spec)
    assert unsupported(model_spec("moe-tiny")) is None
