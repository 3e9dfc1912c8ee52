"""`meshplan profile cluster` and `meshplan profile model` end to end on CPU with gloo.

Few launches (each costs seconds of process start-up on a 2-core machine): a 4-process run through
torchrun directly (the multi-node form), and a 2-process run through the CLI that hangs on purpose and
is then resumed to completion.
Timings are never asserted (the machine is shared); structure and agreement with independent sources are.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main as meshplan
from planner.cost.kernels import Dtypes
from planner.cost.model import CostModel
from planner.cost.memory import block_activation_bytes
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.profile_data import load_profile
from planner.specs import TrainingSpec

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--p2p-sizes", "4K,256K,2M", "--collective-sizes", "64K,1M", "--reps", "3"]
LAUNCH_TIMEOUT = 300


def run_cli(*args: str, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`meshplan ...` in a fresh process (what a user runs)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=REPO, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def call(capsys, *args: str) -> tuple[int, str, str]:
    """`meshplan ...` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        meshplan(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c4") / "cluster.json"
    raw = out.with_name("raw.json")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                        "-m", "profiler.cluster", "-o", str(out), "--raw", str(raw), "--no-progress", *SMALL],
                       cwd=REPO, text=True, capture_output=True, timeout=LAUNCH_TIMEOUT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _assert_measured_cluster(path: Path, world: int) -> None:
    c = load_cluster(str(path))                    # exactly what `--cluster` does
    assert c.measured and c.backend == "gloo" and c.world_size == world
    assert c.num_nodes == 1 and c.gpus_per_node == world
    gpu = c.gpu
    assert gpu.memory_bytes > 0 and gpu.peak_flops["fp32"] > 1e8 and gpu.hbm_bandwidth > 1e8
    assert 0 < gpu.efficiency.gemm_max <= 1 and gpu.efficiency.gemm_tile >= 0
    assert 0 < gpu.efficiency.kernel_overhead_s < 1e-2
    lm = c.link_matrix
    assert lm is not None and lm.world_size == world
    for i in range(world):
        assert lm.bandwidth[i][i] == 0 and lm.latency[i][i] == 0
    ratios = []
    for i, j in itertools.permutations(range(world), 2):
        assert lm.bandwidth[i][j] > 1e7, f"link {i}->{j}: {lm.bandwidth[i][j]} B/s"
        assert 0 <= lm.latency[i][j] < 0.05
        ratios.append(abs(math.log(lm.bandwidth[i][j] / lm.bandwidth[j][i])))
    # one machine, loopback both ways: typically (median) the two directions of a pair agree within 2x; host
    # noise on a shared 2-core VM can still skew a single pair several-fold (8.7x seen once), so a lone pair
    # only has to stay within 16x (an order of magnitude would mean a measurement bug, not noise)
    assert max(ratios) < math.log(16), ratios
    assert sorted(ratios)[len(ratios) // 2] < math.log(2), ratios
    seen = {(m.op, m.group_size, m.contiguous) for m in c.collectives}
    for g in (d for d in range(2, world + 1) if world % d == 0):
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            assert (op, g, True) in seen
            if g < world:
                assert (op, g, False) in seen
    assert all(m.bus_bandwidth > 0 and m.time_s > 0 for m in c.collectives)
    assert 0 <= c.overlap_slowdown <= 1


def test_four_process_cluster_profile_is_a_valid_measured_cluster(cluster4):
    _assert_measured_cluster(cluster4, 4)
    raw = json.loads(cluster4.with_name("raw.json").read_text())
    assert len(raw["links"]) == 3                  # 4 ranks: a tournament of 3 parallel rounds
    assert all(len(r) == 4 for r in raw["links"].values())   # 2 pairs x 2 directions each round
    (gpu,) = load_cluster(str(cluster4)).gpu_types.values()
    assert gpu.async_launch is False               # CPU processes run their own ops: host and op times add
    # the host's seconds per eager kernel, measured on the runtime's blocks: a few microseconds, under H200's host
    host = load_cluster(str(cluster4)).engine_overrides["meshplan"]
    assert 0 < host["host.per_kernel_s"] < 1e-3 and 0 < host["host.per_backward_kernel_s"] < 1e-3
    # the optimizer's per parameter tensor: DTensor's dispatch around every op of the loop costs more
    assert 0 < host["host.optimizer_per_tensor_s"] < host["host.optimizer_per_dtensor_s"] < 1e-2
    # torch.utils.checkpoint: entering a block's region costs the forward host time, and its replay, issued from
    # the autograd engine's unpack hook and recording a graph again, more per op than the forward (3x here)
    assert 0 < host["host.checkpoint_forward_s"] < 1e-2 and host["host.recompute_kernel_factor"] > 1.2
    blocks = raw["devices"]["0"]["host_issue"]["blocks"]
    assert blocks["llama-tiny"]["forward_kernels"] > blocks["gpt-tiny"]["forward_kernels"]   # eager RMSNorm, RoPE


def test_estimate_reads_the_measured_cluster_and_predicts_differently(cluster4, capsys):
    args = ["-m", "gpt-tiny", "-b", "8", "--seq", "64", "--tp", "2", "--precision", "fp32", "--json"]
    rc, out, err = call(capsys, "estimate", "--cluster", str(cluster4), *args)
    assert rc == 0, err
    measured = json.loads(out)
    rc, out, err = call(capsys, "estimate", "--cluster", "cpu-local", "--gpus-per-node", "4", *args)
    assert rc == 0, err
    spec_sheet = json.loads(out)
    assert measured["feasible"] and spec_sheet["feasible"]
    a, b = measured["predicted"]["step_time_s"], spec_sheet["predicted"]["step_time_s"]
    assert a > 0 and b > 0 and a != pytest.approx(b, rel=1e-3)
    # figures of the file, read as plain JSON, are the ones the estimate used: the device's memory and the
    # bytes outside the allocator, and the links the cost model charges
    data = json.loads(cluster4.read_text())
    gpu = data["gpu_types"][data["nodes"]["gpu_type"]]
    memory = measured["predicted"]["memory"]
    assert memory["capacity_bytes"] == gpu["memory_bytes"]
    assert memory["usable_bytes"] == gpu["memory_bytes"] - gpu["runtime_reserved_bytes"]
    assert spec_sheet["predicted"]["memory"]["capacity_bytes"] != gpu["memory_bytes"]
    training = TrainingSpec(global_batch=8, seq_len=64, precision="fp32")
    net = CostModel(PRESETS["gpt-tiny"], load_cluster(str(cluster4)), training).net
    assert net.intra_p2p_bw == data["intra_node"]["bandwidth"]
    assert net.intra_latency == data["intra_node"]["latency"]
    assert net.matrix.bandwidth == data["link_matrix"]["bandwidth"]


def test_two_processes_a_hung_rank_is_named_and_a_rerun_resumes_to_a_valid_cluster(tmp_path):
    out = tmp_path / "cluster.yaml"
    r = run_cli("profile", "cluster", "--nproc", "2", "-o", str(out), "--no-progress", "--timeout", "15", *SMALL,
                env={"MESHPLAN_PROFILE_INJECT": "1:links:hang"})
    assert r.returncode == 4, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "rank 1" in line and "hung in 'links round 1/1'" in line and "--timeout" in line
    log = Path(line.rsplit("log ", 1)[1].rstrip(")"))
    assert log.is_file()                           # torchrun's own output, kept for a failed run
    log.unlink()
    partial = json.loads((tmp_path / "cluster.yaml.partial.json").read_text())
    assert partial["done"] == ["devices"] and not out.exists()

    r = run_cli("profile", "cluster", "--nproc", "2", "-o", str(out), "--no-progress", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout and "3 of 4 steps" in r.stdout and "wrote" in r.stdout
    _assert_measured_cluster(out, 2)
    assert "single node" in load_cluster(str(out)).description
    assert not (tmp_path / "cluster.yaml.partial.json").exists()

    r = run_cli("profile", "cluster", "--nproc", "2", "-o", str(out), *SMALL)   # exists, no --force
    assert r.returncode == 2 and "--force" in r.stderr


def test_resume_refuses_partial_results_of_other_settings(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    (tmp_path / "cluster.json.partial.json").write_text(json.dumps(
        {"kind": "cluster_profile_raw", "schema_version": 1, "config": {"world_size": 8}, "done": []}))
    rc, _, err = call(capsys, "profile", "cluster", "--nproc", "2", "-o", str(out), "--no-progress", *SMALL)
    assert rc == 2 and "other settings (world_size)" in err and "--force" in err


def test_cluster_input_errors_are_one_line(capsys, tmp_path):
    rc, _, err = call(capsys, "profile", "cluster", "--nproc", "1", "-o", str(tmp_path / "c.json"))
    assert rc == 2 and "--nproc" in err
    rc, _, err = call(capsys, "profile", "cluster", "--nproc", "2", "-o", str(tmp_path / "c.json"),
                      "--p2p-sizes", "4K,1M")
    assert rc == 2 and "at least 3" in err
    rc, _, err = call(capsys, "profile", "cluster", "--nproc", "2", "-o", str(tmp_path / "c.txt"))
    assert rc == 2 and "must end in" in err
    for flag, value, allowed in (("--reps", "0", "1..10,000"), ("--timeout", "0", "1e-06..604,800"),
                                 ("--collective-timeout", "-1", "1e-06..604,800")):
        rc, _, err = call(capsys, "profile", "cluster", "--nproc", "2", "-o", str(tmp_path / "c.json"), flag, value)
        assert rc == 2 and err.strip().splitlines() == [f"error: {flag}: must be in {allowed} (got {value})"], err


def test_an_input_error_from_the_ranks_leaves_no_log_behind(tmp_path, capsys, monkeypatch):
    """The ranks refuse their input (here: a stand-in for torchrun that reports what profiler.cluster
    reports); the one-line error is the whole story, so torchrun's log file is removed."""
    import tempfile

    from profiler import cli

    logs = tmp_path / "tmp"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))

    def ranks_refuse(cmd, stderr, env):
        error_file = cmd[cmd.index("--error-file") + 1]
        Path(error_file).write_text("input\t--output: partial results were measured with other settings\n")
        stderr.write("torchrun output\n")
        return 2

    monkeypatch.setattr(cli.subprocess, "call", ranks_refuse)
    rc, _, err = call(capsys, "profile", "cluster", "--nproc", "2", "-o", str(tmp_path / "c.json"), *SMALL)
    assert rc == 2 and "other settings" in err, err
    assert list(logs.iterdir()) == []


# ---------------------------------------------------------------------------------------------- model
def _check_blocks_against_cost_model(path: Path) -> None:
    prof = load_profile(path)
    dt = Dtypes.of(prof.run_precision or prof.precision)
    for b in prof.blocks:
        expect = block_activation_bytes(prof.model, b.mbs, prof.seq_len, b.tp, False, b.recompute, dt,
                                        moe_layer=b.layer == "moe")
        assert b.activation_bytes == pytest.approx(expect, rel=0.05), b
        assert b.forward_s > 0 and b.backward_s > 0


def test_model_profile_of_gpt_tiny(tmp_path, capsys):
    out = tmp_path / "gpt.json"
    rc, stdout, err = call(capsys, "profile", "model", "-m", "gpt-tiny", "--seq", "64", "--tp", "1,2", "--mbs", "1,2",
                           "--precision", "fp32", "--recompute", "none,selective,full", "-o", str(out),
                           "--no-progress", "--reps", "2", "--warmup", "1", "--threads", "1")
    assert rc == 0, err
    assert "about" in stdout and "wrote" in stdout
    prof = load_profile(out)                      # validates (what --profile reads)
    assert prof.complete and prof.model == PRESETS["gpt-tiny"] and prof.seq_len == 64
    assert prof.device.type == "cpu" and prof.run_precision is None
    assert {(b.tp, b.mbs, b.recompute) for b in prof.blocks} == set(
        itertools.product([1, 2], [1, 2], ["none", "selective", "full"]))
    assert {(e.part, e.tp, e.mbs) for e in prof.ends} == set(itertools.product(["embedding", "head"], [1, 2], [1, 2]))
    assert prof.optimizer_s_per_param and prof.optimizer == "adamw"
    _check_blocks_against_cost_model(out)

    # the planner takes it: estimate says the layer numbers are measured
    rc, stdout, err = call(capsys, "estimate", "-m", "gpt-tiny", "-c", "cpu-local", "-b", "8", "--seq", "64",
                           "--precision", "fp32", "--tp", "2", "--profile", str(out), "--json")
    assert rc == 0, err
    measured = json.loads(stdout)["predicted"]
    assert measured["sources"]["layer times and activation bytes"].startswith("measured")
    rc, stdout, err = call(capsys, "estimate", "-m", "gpt-tiny", "-c", "cpu-local", "-b", "8", "--seq", "64",
                           "--precision", "fp32", "--tp", "2", "--json")
    computed = json.loads(stdout)["predicted"]
    assert computed["sources"]["layer times and activation bytes"].startswith("computed")
    assert measured["step_time_s"] != pytest.approx(computed["step_time_s"], rel=1e-3)
    # and so does the search
    rc, stdout, err = call(capsys, "plan", "-m", "gpt-tiny", "-c", "cpu-local", "-b", "8", "--seq", "64",
                           "--precision", "fp32", "--profile", str(out), "--json")
    assert rc == 0, err
    assert json.loads(stdout)["predicted"]["sources"]["layer times and activation bytes"].startswith("measured")


def test_model_profile_of_a_mixture_of_experts_model_is_used_by_plan(tmp_path, capsys):
    """moe-tiny (layer 0 dense, layers 1-3 MoE): both kinds of block are measured at every (tp, mbs, recompute),
    the MoE block's kept bytes agree with the cost model's count (planner/cost/moe.py) as the dense block's do,
    and estimate and plan read the profile and say that the MoE blocks' numbers are measured."""
    out = tmp_path / "moe.json"
    rc, stdout, err = call(capsys, "profile", "model", "-m", "moe-tiny", "--seq", "32", "--tp", "1,2", "--mbs", "1",
                           "--precision", "fp32", "--recompute", "none,full", "-o", str(out), "--no-progress",
                           "--reps", "1", "--warmup", "0", "--threads", "1")
    assert rc == 0, err
    prof = load_profile(out)
    assert prof.complete and prof.model == PRESETS["moe-tiny"]
    assert {(b.layer, b.tp, b.recompute) for b in prof.blocks} == set(
        itertools.product(["dense", "moe"], [1, 2], ["none", "full"]))
    _check_blocks_against_cost_model(out)
    common = ["-m", "moe-tiny", "-c", "cpu-local", "--gpus-per-node", "4", "-b", "8", "--seq", "32",
              "--precision", "fp32"]
    rc, stdout, err = call(capsys, "estimate", *common, "--tp", "2", "--sp", "--ep", "2", "--profile", str(out),
                           "--json")
    assert rc == 0, err
    measured = json.loads(stdout)["predicted"]
    said = measured["sources"]["layer times and activation bytes"]
    assert said.startswith("measured") and "dense blocks measured" in said and "MoE blocks measured" in said, said
    rc, stdout, err = call(capsys, "estimate", *common, "--tp", "2", "--sp", "--ep", "2", "--json")
    assert measured["step_time_s"] != pytest.approx(json.loads(stdout)["predicted"]["step_time_s"], rel=1e-3)
    rc, stdout, err = call(capsys, "plan", *common, "--profile", str(out), "--json")
    assert rc == 0, err
    assert json.loads(stdout)["predicted"]["sources"]["layer times and activation bytes"].startswith("measured")


def test_model_profile_resumes_and_labels_the_precision_that_ran(tmp_path, capsys):
    """llama-tiny asked in bf16: on CPU the runtime computes fp32, and the file says so. A partial file
    with some measurements is resumed: those are kept, the rest measured."""
    out = tmp_path / "llama.json"
    args = ["profile", "model", "-m", "llama-tiny", "--seq", "64", "--tp", "1,2", "--mbs", "1,2",
            "--precision", "bf16", "-o", str(out), "--no-progress", "--reps", "2", "--warmup", "1", "--threads", "1"]
    rc, _, err = call(capsys, *args)
    assert rc == 0, err
    full = load_profile(out)
    assert full.precision == "bf16" and full.run_precision == "fp32"
    _check_blocks_against_cost_model(out)

    partial = full.model_copy(deep=True)
    partial.blocks = partial.blocks[:3]
    partial.ends = []
    partial.complete = False
    (tmp_path / "llama.json.partial.json").write_text(partial.model_dump_json())
    rc, stdout, err = call(capsys, *args)
    assert rc == 2 and "--force" in err            # the output exists
    out.unlink()
    rc, stdout, err = call(capsys, *args)
    assert rc == 0, err
    assert "resuming" in stdout and f"{len(full.blocks) - 3 + 8} of {len(full.blocks) + 8 + 1}" in stdout
    again = load_profile(out)
    assert again.blocks[:3] == full.blocks[:3] and len(again.blocks) == len(full.blocks) and len(again.ends) == 8


def test_measurements_skipped_for_lack_of_memory_leave_an_incomplete_profile_that_a_rerun_completes(
        tmp_path, capsys, monkeypatch):
    import torch

    from profiler import model

    measure = model._run_task

    def head_out_of_memory(prof, task, *args):
        if task.kind == "head":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        measure(prof, task, *args)

    out = tmp_path / "p.json"
    args = ["profile", "model", "-m", "gpt-tiny", "--seq", "64", "--tp", "1", "--mbs", "1", "--recompute", "none",
            "-o", str(out), "--no-progress", "--reps", "1", "--warmup", "0", "--threads", "1"]
    with monkeypatch.context() as m:
        m.setattr(model, "_run_task", head_out_of_memory)
        rc, stdout, err = call(capsys, *args)
    assert rc == 0, err
    assert "skipped (out of device memory): head tp1 mbs1" in stdout and "incomplete" in stdout
    first = load_profile(out)                      # the planner still reads what was measured
    assert not first.complete
    assert [(e.part, e.tp, e.mbs) for e in first.ends] == [("embedding", 1, 1)]
    assert len(first.blocks) == 1 and first.optimizer_s_per_param

    rc, stdout, err = call(capsys, *args)          # no --force needed: the rerun completes the file
    assert rc == 0, err
    assert "resuming p.json" in stdout and "1 of 4 measurements" in stdout and "skipped (" not in stdout
    done = load_profile(out)
    assert done.complete and {e.part for e in done.ends} == {"embedding", "head"}
    assert done.blocks == first.blocks and done.optimizer_s_per_param == first.optimizer_s_per_param
    rc, _, err = call(capsys, *args)               # a complete profile is the user's: kept without --force
    assert rc == 2 and "--force" in err


def test_model_profile_input_errors_and_timeout(tmp_path, capsys):
    rc, _, err = call(capsys, "profile", "model", "-m", "gpt-tiny", "--tp", "3", "--seq", "64",
                      "-o", str(tmp_path / "p.json"))
    assert rc == 2 and "--tp" in err and "does not divide" in err
    rc, _, err = call(capsys, "profile", "model", "-m", "gpt-tiny", "--seq", "4096", "-o", str(tmp_path / "p.json"))
    assert rc == 2 and "max_position_embeddings" in err
    rc, _, err = call(capsys, "profile", "model", "-m", "gpt-tiny", "--recompute", "some", "--seq", "64",
                      "-o", str(tmp_path / "p.json"))
    assert rc == 2 and "--recompute" in err
    # the estimate's probe blocks come first, under the same deadline as every measurement
    r = run_cli("profile", "model", "-m", "gpt-tiny", "--seq", "64", "--tp", "1", "--mbs", "1", "--timeout", "1e-6",
                "-o", str(tmp_path / "p.json"), "--no-progress", "--threads", "1")
    assert r.returncode == 4 and "'time estimate (probe blocks)'" in r.stderr and "--timeout" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_failing_probe_of_the_estimate_is_one_line(tmp_path, capsys, monkeypatch):
    from profiler import layers

    def broken(*args, **kwargs):
        raise RuntimeError("probe broke\nsecond line")

    monkeypatch.setattr(layers, "measure_block", broken)
    rc, _, err = call(capsys, "profile", "model", "-m", "gpt-tiny", "--seq", "64", "--tp", "1", "--mbs", "1",
                      "-o", str(tmp_path / "p.json"), "--no-progress")
    assert rc == 4, err
    assert err.strip().splitlines() == [
        "error: measurement 'time estimate (probe blocks)' failed: RuntimeError: probe broke"], err
    assert not (tmp_path / "p.json").exists()
