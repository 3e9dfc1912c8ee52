"""`meshplan run` end to end: a 2x2x2 plan on 8 CPU processes with checkpoints; fault drills on 2 processes (a
rank that raises, a rank killed with SIGKILL, a failed save, damaged checkpoints, the launcher killed, the
resumed curve); bad input refused before launch; the multi-node command lines. (Bit-exact resume under
TP + SP + ZeRO-3 + interleaved 1F1B is in test_runtime_exactness.py.)"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from planner.cost.model import CostModel
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.specs import ParallelConfig, TrainingSpec
from tests.runtime_helpers import PYTHON, ROOT, make_test_plan, model_spec, reference_losses, relative_error

E2E_STEPS = 5


def meshplan(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "planner.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env={**os.environ, **(env or {})})


def write_plan(path, **kwargs):
    path.write_text(make_test_plan(**kwargs).model_dump_json(indent=1))
    return path


def fake_checkpoint(root, step):
    """A directory that looks like a complete checkpoint of an earlier run."""
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_text("x")
    (d / "meshplan.json").write_text(json.dumps({"step": step, "fingerprint": "earlier run"}))
    return d


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`meshplan run` of a tp2 pp2 dp2 plan for 5 steps, checkpointing every 2 steps, with --force into a
    checkpoint directory that holds an earlier run's checkpoints and a file of the user's."""
    tmp = tmp_path_factory.mktemp("e2e")
    plan = write_plan(tmp / "plan.json", global_batch=8, seq=64, tp=2, pp=2, dp=2)
    fake_checkpoint(tmp / "ckpt", 8)
    (tmp / "ckpt" / "step_00000004.partial").mkdir()
    (tmp / "ckpt" / "notes.txt").write_text("mine")
    proc = meshplan("run", plan, "--steps", E2E_STEPS, "--report", tmp / "run.json", "--html", tmp / "run.html",
                    "--checkpoint-dir", tmp / "ckpt", "--checkpoint-every", 2, "--force", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp, plan, proc, json.loads((tmp / "run.json").read_text())


def test_end_to_end_2x2x2_matches_single_process_and_reports(e2e):
    tmp, _, proc, report = e2e
    want = reference_losses(model_spec("gpt-tiny"), 8, 64, E2E_STEPS)
    assert relative_error(report["losses"], want) < 1e-5, (report["losses"], want)
    m = report["measured"]
    assert len(m["per_rank"]) == 8
    assert sorted(r["rank"] for r in m["per_rank"]) == list(range(8))
    assert {(r["pp"], r["dp"], r["tp"]) for r in m["per_rank"]} == {(p, d, t) for p in (0, 1) for d in (0, 1)
                                                                       for t in (0, 1)}
    assert all(len(r["step_times_s"]) == E2E_STEPS for r in m["per_rank"])
    assert m["step_time_s"] > 0 and m["tokens_per_s"] == pytest.approx(8 * 64 / m["step_time_s"])
    assert m["memory_kind"] == "cpu_peak_rss"
    assert m["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in m["per_rank"]) > 0
    assert 0 < m["peak_memory_increase_bytes"] < m["peak_memory_bytes"]
    for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes"):
        assert report["predicted"][key] > 0 and report["error_pct"][key] is not None
    assert report["plan"]["config"]["tp"] == 2 and report["run"]["world_size"] == 8
    # the table on stdout, the progress bar on stderr
    assert "predicted" in proc.stdout and "measured" in proc.stdout and "step time" in proc.stdout
    assert f"{E2E_STEPS}/{E2E_STEPS}" in proc.stderr
    # atomic checkpoints: complete step directories only, the earlier run's gone (--force), the user's file kept
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["notes.txt", "step_00000002", "step_00000004"]


def test_end_to_end_run_html_draws_the_run(e2e):
    """`--html` writes the page of the plan and the run: its run charts hold the report's own numbers."""
    from planner.html_report import build_html
    from planner.html_report.data import run_data
    from planner.html_report.inputs import RunReport
    from planner.plan import load_plan

    tmp, plan_file, proc, report = e2e
    page = (tmp / "run.html").read_text()
    assert f"report written to {tmp / 'run.html'}" in proc.stdout
    plan, run = load_plan(plan_file), RunReport.model_validate(report)
    assert page == build_html(plan, run)
    drawn = run_data(plan, run)
    assert [r["step_time_s"] for r in drawn["ranks"]] == [
        r["step_time_s"] for r in sorted(report["measured"]["per_rank"], key=lambda r: r["rank"])]
    assert [x["loss"] for x in drawn["losses"]] == report["losses"] and len(report["losses"]) == E2E_STEPS
    assert page.count('<circle class="pt"') == E2E_STEPS and 'id="run"' in page


# ----------------------------------------------------------------------------------------------
# Fault drills: one 2-process plan through five launches of `meshplan run` (10 steps, checkpoints every 2)
# ----------------------------------------------------------------------------------------------
FAULT = "MESHPLAN_INJECT_FAULT"
DRILL_STEPS = 10


def _names(root):
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _processes_mentioning(text: str) -> list[str]:
    """The command lines of live processes that mention `text` (zombies have none)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and d != str(os.getpid()):
                found.append(f"{d}: {cmd[:200]}")
    return found


def _biggest_shard(checkpoint):
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    """1. rank 1 raises at step 3; 2. --resume, the save at step 4 fails (disk full on rank 1), rank 1 is
    killed with SIGKILL in the middle of step 9; 3. the step-8 checkpoint is truncated and the step-6 one
    corrupted; 4. --resume with rank 0 hanging at step 5, and `meshplan run` itself killed with SIGKILL once
    step 4 is saved; 5. --resume to the end."""
    tmp = tmp_path_factory.mktemp("drills")
    plan = write_plan(tmp / "plan.json", dp=2, mbs=2)
    ckpt = tmp / "ckpt"
    common = ["run", plan, "--steps", DRILL_STEPS, "--checkpoint-dir", ckpt]
    out = {"ckpt": ckpt}
    out["raised"] = meshplan(*common, "--checkpoint-every", 2, env={FAULT: "1:3"})
    out["after_raise"] = _names(ckpt)
    out["killed"] = meshplan(*common, "--checkpoint-every", 2, "--resume", env={FAULT: "1:4:nospace,1:9:kill"})
    out["after_kill"] = _names(ckpt)
    out["curve_to_8"] = json.loads((ckpt / "step_00000008" / "meshplan.json").read_text())["losses"]

    shard = _biggest_shard(ckpt / "step_00000008")
    out["truncated"] = shard.name
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    shard = _biggest_shard(ckpt / "step_00000006")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with open(tmp / "hang.err", "w") as err:
        launcher = subprocess.Popen([PYTHON, "-m", "planner.cli", *map(str, common), "--checkpoint-every", "2",
                                     "--resume"], stdout=subprocess.DEVNULL, stderr=err, cwd=str(ROOT),
                                    env={**os.environ, FAULT: "0:5:hang"})
        deadline = time.monotonic() + 600
        while not (ckpt / "step_00000004").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        out["hang_started"] = launcher.poll() is None and (ckpt / "step_00000004").exists()
        launcher.kill()                                   # SIGKILL: no chance to clean up
        launcher.wait()
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(ckpt)) and time.monotonic() < deadline:
        time.sleep(0.2)
    out["left_behind"] = _processes_mentioning(str(ckpt))
    out["hang_stderr"] = (tmp / "hang.err").read_text()

    out["final"] = meshplan(*common, "--resume", "--report", tmp / "run.json")
    out["report"] = json.loads((tmp / "run.json").read_text()) if (tmp / "run.json").is_file() else None
    return out


def test_a_crashing_rank_is_named_and_the_run_resumes(drills):
    """Rank 1 raises at step 3 (after the step-2 checkpoint): its own error is named, whatever its teardown
    might do (it reports, fsyncs and leaves before anything can abort it), and the run resumes."""
    proc = drills["raised"]
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: rank 1 failed: RuntimeError: injected fault on rank 1 at step 3" in proc.stderr
    assert drills["after_raise"] == ["step_00000002"]
    assert drills["killed"].stderr.count("launching") == 1       # the resumed run started


def test_a_rank_killed_mid_step_is_named(drills):
    proc = drills["killed"]
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: rank 1 failed: killed by signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(drills):
    """Disk full on rank 1 at step 4: nothing of that save is left, step 2 is named as still the newest, and
    training goes on to save steps 6 and 8."""
    err = drills["killed"].stderr
    assert ("warning: the checkpoint of step 4 was not saved (rank 1: OSError: [Errno 28] No space left on "
            "device") in err, err[-3000:]
    assert f"'{drills['ckpt'] / 'step_00000002'}' is still the newest usable checkpoint" in err
    assert drills["after_kill"] == ["step_00000002", "step_00000006", "step_00000008"]


def test_damaged_checkpoints_are_refused_and_the_newest_intact_one_used(drills):
    ckpt = drills["ckpt"]
    for err, resumed in ((drills["hang_stderr"], 2), (drills["final"].stderr, 4)):
        assert (f"warning: checkpoint '{ckpt / 'step_00000008'}' is damaged ({drills['truncated']} has "
                in err), err[-3000:]
        assert "when saved (truncated)); not used; resuming from" in err
        assert (f"warning: checkpoint '{ckpt / 'step_00000006'}' is damaged (" in err
                and "does not have the contents it was saved with (corrupted)); not used; resuming from "
                    f"'{ckpt / f'step_{resumed:08d}'}'" in err), err[-3000:]
    assert drills["report"]["run"]["resumed_from_step"] == 4


def test_killing_the_launcher_leaves_no_process_behind(drills):
    assert drills["hang_started"], drills["hang_stderr"][-3000:]
    assert drills["left_behind"] == []


def test_resume_continues_the_identical_loss_curve(drills):
    """After all that, the curve is the uninterrupted one: steps 1-8 bit for bit those the killed run had
    reached (5-8 now computed after resuming at 4), and all 10 within 1e-5 of the plain PyTorch reference."""
    proc, report = drills["final"], drills["report"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(report["losses"]) == DRILL_STEPS
    assert report["losses"][:8] == drills["curve_to_8"]
    want = reference_losses(model_spec("gpt-tiny"), 8, 32, DRILL_STEPS)
    assert relative_error(report["losses"], want) < 1e-5


def _edit(path, out, fn):
    data = json.loads(path.read_text())
    fn(data)
    out.write_text(json.dumps(data))
    return out


def test_bad_input_is_refused_before_launch(tmp_path):
    plan = write_plan(tmp_path / "plan.json", tp=2)
    short = tmp_path / "short.bin"
    np.arange(20, dtype=np.uint16).tofile(short)
    wide = tmp_path / "wide.bin"
    (np.arange(4096) % 500 + 1).astype(np.uint32).tofile(wide)
    (tmp_path / "exists.json").write_text("{}")
    fake_checkpoint(tmp_path / "earlier", 6)
    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop)
    cases = [
        (["--data", loop, "--print-command"], "--data"),
        (["--nproc-per-node", 4], "the plan is for 2 processes (tp 2 x pp 1 x dp 1) but 4 were started"),
        (["--data", short], "holds 20 tokens; one training sequence needs seq_len + 1 = 33"),
        (["--data", wide], "looks like uint32 token ids"),
        (["--report", tmp_path / "exists.json"], "exists; pass --force"),
        (["--html", tmp_path / "exists.json"], f"--html: '{tmp_path / 'exists.json'}' exists; pass --force"),
        (["--html", tmp_path / "r.html", "--print-command"], "--html: the ranks of a multi-node run write only"),
        (["--resume"], "needs --checkpoint-dir"),
        (["--checkpoint-dir", tmp_path / "none", "--resume"], "no complete checkpoint"),
        (["--lr", "nan"], "--lr: must be a finite number in 0..10 (got nan)"),
        (["--report", "/sys/run.json"], "--report: cannot write in '/sys'"),
        (["--checkpoint-dir", "/proc/meshplan-ckpt", "--checkpoint-every", 2],
         "--checkpoint-dir: cannot write in '/proc/meshplan-ckpt'"),
        (["--checkpoint-dir", tmp_path / "earlier", "--checkpoint-every", 2],
         "--checkpoint-dir: '" + str(tmp_path / "earlier") + "' holds checkpoints of an earlier run; pass --resume "
         "to continue it or --force to start over"),
    ]
    old = _edit(plan, tmp_path / "old.json", lambda d: d.update(schema_version=0))
    heads = _edit(plan, tmp_path / "heads.json", lambda d: d["model"].update(num_heads=1))
    for target, args, match in [(plan, a, m) for a, m in cases] + [
            (old, [], "has schema_version 0; this meshplan reads version 2"),
            (heads, [], "tp 2 does not divide num_heads 1 (valid tp: 1)")]:
        proc = meshplan("run", target, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert match in proc.stderr, (args, proc.stderr)
        assert "launching" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_ranks_refuse_a_plan_for_another_world_size(tmp_path):
    """Started under torchrun with the wrong process count (as a hand-written torchrun line would), the
    ranks stop before training with exit 2, and `meshplan run`'s launcher reports bad input."""
    from rich.console import Console

    from runtime.launch import Launch, torchrun_command

    plan = write_plan(tmp_path / "plan.json", dp=4)
    cmd = torchrun_command(["--plan", str(plan), "--job-dir", str(tmp_path)], nproc_per_node=2)
    launch = Launch(cmd, tmp_path, Console(file=io.StringIO()))
    assert launch.run() != 0
    assert any(re.search(r"exitcode\s*:\s*2", line) for line in launch.stderr_tail)
    failure = launch.failure()
    assert failure.kind == "input"
    assert failure.message == "plan: the plan is for 4 processes (tp 1 x pp 1 x dp 4) but 2 were started"


def test_print_command_for_a_multi_node_plan(tmp_path):
    spec = model_spec("gpt-tiny")
    cluster = load_cluster("cpu-local", nodes=2, gpus_per_node=4)
    training = TrainingSpec(global_batch=8, seq_len=32, precision="fp32")
    cfg = ParallelConfig(tp=2, pp=2, dp=2)
    plan = tmp_path / "plan.json"
    plan.write_text(make_plan(spec, cluster, training, CostModel(spec, cluster, training).evaluate(cfg))
                    .model_dump_json())
    proc = meshplan("run", plan, "--print-command", "--rdzv-endpoint", "head0:29411", "--steps", 3)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if "torch.distributed.run" in x]
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert line.startswith(sys.executable)
        for part in ("--nnodes=2", f"--node-rank={node}", "--nproc-per-node=4", "--master-addr=head0",
                     "--master-port=29411", "-m runtime.train", f"--plan {plan}", "--steps 3"):
            assert part in line, (part, line)
    one = meshplan("run", plan, "--print-command", "--rdzv-endpoint", "head0:29411", "--node-rank", 1)
    assert one.stdout.count("torch.distributed.run") == 1 and "--node-rank=1" in one.stdout
    refused = meshplan("run", plan)
    assert refused.returncode == 2 and "--print-command" in refused.stderr
    bad = meshplan("run", plan, "--print-command", "--rdzv-endpoint", "head0")
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout
    assert bad.stderr.strip().splitlines() == ["error: --rdzv-endpoint: 'head0' is not host:port (port 1-65535), "
                                               "e.g. node0:29500"], bad.stderr


@pytest.mark.parametrize("text,ok", [
    ("head0:29411", ("head0", 29411)), ("10.0.0.5:1", ("10.0.0.5", 1)), ("[fe80::1]:29500", ("fe80::1", 29500)),
    ("head0", None), ("head0:", None), (":29500", None), ("head0:http", None), ("head0:0", None),
    ("head0:65536", None), ("my host:29500", None), ("head0:-5", None),
])
def test_rendezvous_endpoint_is_host_and_port(text, ok):
    from planner.errors import InputError
    from runtime.launch import parse_endpoint

    if ok is not None:
        assert parse_endpoint(text) == ok
    else:
        with pytest.raises(InputError) as exc:
            parse_endpoint(text)
        assert exc.value.field == "--rdzv-endpoint"


def test_cli_module_does_not_import_torch():
    code = "import sys, planner.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([PYTHON, "-c", code], cwd=str(ROOT)).returncode == 0


def test_a_plan_costed_with_compile_runs_compiled_and_trains_the_same(tmp_path):
    """`estimate --compile` records the compiled engine in the plan; `meshplan run` then torch.compiles each
    block (inductor on CPU) and trains the same losses as the eager run, to float rounding."""
    plans = {}
    for flag in ("--compile", "--no-compile"):
        plans[flag] = tmp_path / f"plan{flag}.json"
        proc = subprocess.run([PYTHON, "-m", "planner.cli", "estimate", "--model", "llama-tiny", "--cluster", "cpu-local",
                               "--nodes", "1", "--gpus-per-node", "1", "-b", "4", "--seq", "32", "--precision", "fp32",
                               flag, "-o", str(plans[flag])], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    compiled, eager = (json.loads(plans[f].read_text()) for f in ("--compile", "--no-compile"))
    assert compiled["engine"]["compile"] and not eager["engine"]["compile"]
    assert compiled["predicted"]["step_time_s"] != eager["predicted"]["step_time_s"]
    reports = {}
    for flag, plan in plans.items():
        reports[flag] = tmp_path / f"run{flag}.json"
        proc = meshplan("run", plan, "--steps", 2, "--report", reports[flag])
        assert proc.returncode == 0, proc.stderr
    runs = {f: json.loads(r.read_text()) for f, r in reports.items()}
    assert runs["--compile"]["run"]["compiled"] and not runs["--no-compile"]["run"]["compiled"]
    assert relative_error(runs["--compile"]["losses"], runs["--no-compile"]["losses"]) < 1e-6
