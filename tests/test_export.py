"""`meshplan export` and `estimate --from`: round trips, the nearest configuration a target expresses, refusals,
the launch scripts, and launches written by hand predicted like the same configuration typed as options."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from planner.export import export_plan
from planner.export.torchtitan import default_split
from tests.cli_helpers import run_cli
from tests.export_helpers import PLANS, make_test_plan, write_export

CONFIG_KEYS = ("tp", "pp", "dp", "ep", "vpp", "mbs", "zero", "recompute", "sp", "schedule", "layers_per_stage",
               "layout")


def _estimate_from(capsys, directory, plan, *extra):
    c = plan.cluster
    r = run_cli(capsys, "estimate", "--from", directory, "--cluster", _cluster_name(plan), "--json", *extra)
    assert r.code == 0, r.err
    assert c.world_size == r.json()["config"]["tp"] * r.json()["config"]["pp"] * r.json()["config"]["dp"]
    return r.json()


def _cluster_name(plan) -> str:
    return {"NVIDIA A100-SXM4-80GB": "dgx-a100-80gb"}.get(plan.cluster.gpu.name, plan.cluster.name)


@pytest.mark.parametrize("name,target", [
    ("gpt_dense", "megatron"), ("llama_gqa", "torchtitan"), ("interleaved_uneven", "megatron"),
    ("interleaved_uneven_amp", "torchtitan"), ("gpt_fp16_pp", "megatron"), ("gpt_pipe_zero1", "deepspeed"),
    ("gpt_zero2_tp", "deepspeed"), ("llama_zero2_pp", "torchtitan"),
    ("mixtral_ep_tp", "megatron"), ("qwen3_moe_ep", "megatron"), ("moe_variants", "megatron"),
    ("qwen3_moe_fsdp", "torchtitan"), ("mixtral_ep_zero3", "deepspeed"), ("mixtral_fsdp_interleaved", "megatron"),
    ("qwen3_moe_pp", "torchtitan"), ("mla_moe", "megatron"),
])
def test_export_read_back_gives_the_plans_configuration_and_prediction(capsys, tmp_path, name, target):
    """A plan costed for the target's engine, exported and read back, predicts the same."""
    plan = make_test_plan(name, engine=target)
    result = export_plan(plan, target)
    assert result.adjusted.changes == (), result.adjusted.changes     # these plans are expressible exactly
    write_export(result, tmp_path)
    extra = ["--model", PLANS[name][0], "--seq", str(plan.training.seq_len)] if target == "deepspeed" else []
    d = _estimate_from(capsys, tmp_path, plan, *extra)
    want = plan.config.model_dump()
    assert {k: d["config"][k] for k in CONFIG_KEYS} == {k: want[k] for k in CONFIG_KEYS}
    assert d["predicted"]["step_time_s"] == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    assert d["predicted"]["peak_reserved_bytes"] == plan.predicted.peak_reserved_bytes
    assert d["predicted"]["tokens_per_s"] == pytest.approx(plan.predicted.tokens_per_s, rel=1e-12)
    if plan.model.moe is not None:      # the same experts read back: total and active parameters
        from planner.cost.params import active_params, total_params
        assert (d["model"]["params"], d["model"]["active_params"]) == (total_params(plan.model),
                                                                      active_params(plan.model))


def test_an_args_file_or_a_bare_ds_config_reads_like_the_directory(capsys, tmp_path):
    plan = make_test_plan("gpt_dense", engine="megatron")
    write_export(export_plan(plan, "megatron"), tmp_path)
    whole = _estimate_from(capsys, tmp_path, plan)
    for name in ("args.json", "args.txt"):   # no launch.sh beside it: the cluster's GPUs are the world
        assert _estimate_from(capsys, tmp_path / name, plan) == whole
    ds_plan = make_test_plan("gpt_pipe_zero1", engine="deepspeed")
    write_export(export_plan(ds_plan, "deepspeed"), tmp_path / "ds")
    d = _estimate_from(capsys, tmp_path / "ds" / "ds_config.json", ds_plan, "--model", "gpt3-1.3b", "--seq", "2048")
    assert d["predicted"]["step_time_s"] == pytest.approx(ds_plan.predicted.step_time_s, rel=1e-12)


def test_nearest_configuration_is_the_estimate_of_what_was_written(capsys, tmp_path):
    """DeepSpeed cannot interleave, split by a list or run SP: the export says so, and its re-estimate equals
    `meshplan estimate` of the written configuration typed as options."""
    plan = make_test_plan("interleaved_uneven")
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", "megatron", "-o", tmp_path / "m")
    assert r.code == 0 and "changed" not in r.out
    plan1 = make_test_plan("gpt_pipe_zero1")
    plan1_sp = plan1.model_copy(update={"config": plan1.config.model_copy(update={"schedule": "gpipe"})})
    result = export_plan(plan1_sp, "deepspeed")
    assert [c.split(":")[0] for c in result.adjusted.changes] == ["schedule gpipe -> 1f1b with 12,12 layers per stage"]
    r = run_cli(capsys, "estimate", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--nodes", "1", "-b", "64",
                "--tp", "1", "--pp", "2", "--mbs", "2", "--zero", "1", "--recompute", "full",
                "--layers-per-stage", "12,12", "--json")
    assert result.after.predicted.step_time_s == pytest.approx(r.json()["predicted"]["step_time_s"], rel=1e-12)
    r = run_cli(capsys, "estimate", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--nodes", "1", "-b", "64",
                "--tp", "1", "--pp", "2", "--mbs", "2", "--zero", "1", "--recompute", "full",
                "--layers-per-stage", "12,12", "--schedule", "gpipe", "--json")
    assert result.before.predicted.step_time_s == pytest.approx(r.json()["predicted"]["step_time_s"], rel=1e-12)


def _save(plan, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    return path


def test_export_prints_each_change_and_how_far_the_prediction_moves(capsys, tmp_path):
    plan = make_test_plan("interleaved_uneven")
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", "deepspeed", "-o", tmp_path / "ds")
    assert r.code == 2 and "AutoTP" in r.err           # tp 2 with pp 4: refused in one line
    assert len(r.err.strip().splitlines()) == 1
    plan = make_test_plan("gpt_dense")
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", "deepspeed", "-o", tmp_path / "ds")
    assert r.code == 2 and "AutoTP" in r.err
    plan = make_test_plan("interleaved_uneven_amp")
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", "megatron", "-o", tmp_path / "mg")
    assert r.code == 0, r.err
    assert "changed: precision amp-bf16 -> bf16" in r.out
    result = export_plan(plan, "megatron")
    b, a = result.before.predicted.step_time_s, result.after.predicted.step_time_s
    assert f"{b:.4g} s -> {a:.4g} s ({a / b - 1:+.1%})" in r.out
    assert "warning: the plan was costed for the meshplan engine" in r.err
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", "megatron", "-o", tmp_path / "mg2", "--exact")
    assert r.code == 2 and "--exact" in r.err and "amp-bf16" in r.err


@pytest.mark.parametrize("args,field", [
    (["--to", "slurm"], "--to"),
    (["--to", "torchtitan"], "--to torchtitan"),          # GPT-3 1.3B: not a torchtitan flavour
    (["--to", "megatron", "-o", "/nonexistent/dir"], "--output"),
])
def test_export_bad_input_is_one_line_exit_2(capsys, tmp_path, args, field):
    path = _save(make_test_plan("gpt_dense"), tmp_path)
    argv = ["export", path, *args] + ([] if "-o" in args else ["-o", tmp_path / "out"])
    r = run_cli(capsys, *argv)
    assert r.code == 2, (r.out, r.err)
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.err
    if "torchtitan" in args:
        assert "llama3_8b" in lines[0] and "llama3_70b" in lines[0] and "llama3_405b" in lines[0]


def test_export_refuses_to_overwrite_without_force(capsys, tmp_path):
    path = _save(make_test_plan("gpt_dense"), tmp_path)
    assert run_cli(capsys, "export", path, "--to", "megatron", "-o", tmp_path / "out").code == 0
    r = run_cli(capsys, "export", path, "--to", "megatron", "-o", tmp_path / "out")
    assert r.code == 2 and "--force" in r.err
    assert run_cli(capsys, "export", path, "--to", "megatron", "-o", tmp_path / "out", "--force").code == 0


def test_torchtitan_rejects_no_llama_flavour_it_ships():
    from planner.export.torchtitan import FLAVOURS, flavour_of
    from planner.presets import PRESETS
    assert flavour_of(PRESETS["llama3-8b"]) == "llama3_8b"
    assert flavour_of(PRESETS["llama3-70b"]) == "llama3_70b"
    assert flavour_of(PRESETS["llama3-405b"]) == "llama3_405b"
    assert flavour_of(PRESETS["qwen3-30b-a3b"]) == "qwen3_30b_a3b"
    assert set(FLAVOURS) == {"llama3_debugmodel", "llama3_8b", "llama3_70b", "llama3_405b", "qwen3_30b_a3b"}


# ---------------------------------------------------------------------------------------------- mixture of experts
def _rule(layers: int, k: int, every: int) -> list[int]:
    """MoESpec's rule, written out: the first k layers dense, then layer i MoE when (i + 1) % every == 0."""
    return [1 if i >= k and (i + 1) % every == 0 else 0 for i in range(layers)]


def test_megatron_layer_pattern_evaluates_to_the_specs_moe_layers():
    """--moe-layer-freq as Megatron evaluates it (its _eval_pattern: a charset check, then Python's eval) for every
    (first dense layers, every) on up to 12 layers."""
    import re
    from planner.export.megatron import moe_layer_pattern
    from planner.specs import MoESpec
    for layers in range(1, 13):
        for k in range(layers + 1):
            for every in range(1, layers + 1):
                text = moe_layer_pattern(MoESpec(num_experts=4, top_k=2, expert_ffn_size=8, first_dense_layers=k,
                                                 every=every), layers)
                assert not re.search(r"[^,\d\[\]\(\)\+\*]", text)
                value = eval(text)     # noqa: S307 - what Megatron does with it
                got = [1 if i % value == 0 else 0 for i in range(layers)] if isinstance(value, int) else value
                assert got == _rule(layers, k, every), (layers, k, every, text)


def test_reading_a_megatron_layer_pattern_finds_the_spec_form_or_refuses():
    """Every 0/1 pattern on up to 10 layers (brute force): read back as (k, every) exactly when some form gives it,
    and the form found gives it."""
    from itertools import product
    from planner.export.megatron import _dense_then_every
    for layers in range(1, 11):
        forms = {tuple(_rule(layers, k, e)) for k in range(layers + 1) for e in range(1, layers + 1)}
        for pattern in product((0, 1), repeat=layers):
            found = _dense_then_every(list(pattern))
            assert (found is not None) == (pattern in forms), pattern
            if found is not None:
                assert tuple(_rule(layers, *found)) == pattern


@pytest.mark.parametrize("flags,message", [
    (["--moe-token-dispatcher-type", "allgather"], "all-to-all token dispatch"),
    (["--moe-layer-freq", "2"], "--moe-layer-freq 10101010"),          # Megatron's N: layer 0 MoE, then every N-th
    (["--moe-layer-freq", "[1,1,0,0,1,1,0,0]"], "--moe-layer-freq 11001100"),
    (["--moe-layer-freq", "__import__('os')"], "is not an integer or a list expression"),
    (["--moe-router-score-function", "sqrtsoftplus"], "sqrtsoftplus is not modelled"),
    (["--expert-tensor-parallel-size", "1"], "expert tensor parallelism = tp"),
    (["--moe-latent-size", "256"], "MoE latent projections"),
])
def test_megatron_moe_flags_meshplan_does_not_model_are_refused_in_one_line(capsys, tmp_path, flags, message):
    plan = make_test_plan("moe_variants", engine="megatron")
    items = json.loads(export_plan(plan, "megatron").files["args.json"])
    for i in range(0, len(flags), 2):
        if flags[i] in items:
            j = items.index(flags[i])
            del items[j:j + 2]
    (tmp_path / "args.json").write_text(json.dumps(items + flags))
    r = run_cli(capsys, "estimate", "--from", tmp_path / "args.json", "--cluster", "dgx-h100", "--nodes", "1")
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert r.code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.err, r.err


@pytest.mark.parametrize("name,target,update,message", [
    ("mixtral_ep_zero3", "torchtitan", {}, "ships no mixture-of-experts model shaped like mixtral-8x7b"),
    ("qwen3_moe_fsdp", "torchtitan", {"tp": 2, "dp": 8, "sp": True}, "no expert tensor parallelism"),
    ("mixtral_ep_tp", "deepspeed", {}, "AutoEP has no expert tensor parallelism"),
    ("moe_variants", "deepspeed", {"tp": 1, "dp": 4, "sp": False, "pp": 2, "vpp": 1, "schedule": "1f1b",
                                   "layers_per_stage": [4, 4]}, "capacity factor 1.25"),
])
def test_moe_plans_a_target_cannot_run_are_refused_in_one_line(capsys, tmp_path, name, target, update, message):
    plan = make_test_plan(name)
    plan = plan.model_copy(update={"config": plan.config.model_copy(update=update)})
    r = run_cli(capsys, "export", _save(plan, tmp_path), "--to", target, "-o", tmp_path / "out")
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert r.code == 2 and len(lines) == 1 and message in lines[0], r.err
    if target == "torchtitan" and not update:
        assert "qwen3_30b_a3b" in lines[0] and "deepseek_v3" in lines[0]


def test_torchtitan_moe_under_ddp_is_exported_on_fsdp_and_re_estimated():
    """EP needs FSDP's shard dimension in torchtitan: ZeRO 0 -> 2, and the re-estimate is that configuration's."""
    from planner.export import cost_model_for
    plan = make_test_plan("qwen3_moe_fsdp", engine="torchtitan")
    plan = plan.model_copy(update={"config": plan.config.model_copy(update={"zero": 0})})
    result = export_plan(plan, "torchtitan")
    assert [c.split(":")[0] for c in result.adjusted.changes] == ["ZeRO 0 -> 2"]
    assert result.adjusted.config.zero == 2 and result.adjusted.config.ep == 8
    cost = cost_model_for(plan, result.adjusted.training)
    assert result.after.predicted.step_time_s == cost.evaluate(result.adjusted.config).predicted.step_time_s


def test_estimate_from_a_moe_launch_takes_ep_from_it_and_the_imbalance_from_the_command_line(capsys, tmp_path):
    plan = make_test_plan("qwen3_moe_ep", engine="megatron")
    write_export(export_plan(plan, "megatron"), tmp_path)
    r = run_cli(capsys, "estimate", "--from", tmp_path, "--cluster", "dgx-h100", "--ep", "4")
    assert r.code == 2 and "--ep" in r.err and "the launch sets it" in r.err
    r = run_cli(capsys, "estimate", "--from", tmp_path, "--cluster", "dgx-h100", "--moe-imbalance", "1.6", "--json")
    typed = run_cli(capsys, "estimate", "-m", "qwen3-30b-a3b", "-c", "dgx-h100", "--nodes", "2", "-b", "32",
                    "--seq", "2048", "--ep", "8", "--zero", "1", "--recompute", "selective", "-e", "megatron",
                    "--moe-imbalance", "1.6", "--json")
    assert r.code == typed.code == 0, (r.err, typed.err)
    assert r.json()["predicted"]["step_time_s"] == pytest.approx(typed.json()["predicted"]["step_time_s"], rel=1e-12)
    assert r.json()["predicted"]["step_time_s"] > plan.predicted.step_time_s     # 1.6 > the default 1.25


def test_launch_sh_runs_torchrun_with_the_args_file_on_every_node(tmp_path):
    """launch.sh with a stand-in torchrun that prints its arguments: the node's rank and count, then exactly
    args.json; slurm.sbatch with stand-in srun / scontrol starts it once per node."""
    plan = make_test_plan("gpt_fp16_pp")
    write_export(export_plan(plan, "megatron"), tmp_path / "x")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho node-a; echo node-b\n')
    # srun: run the task once per node, as Slurm does
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGATRON_LM": "/opt/megatron",
           "NODE_RANK": "1", "MASTER_ADDR": "node-a", "EXTRA_ARGS": "--mock-data"}
    out = subprocess.run(["bash", tmp_path / "x" / "launch.sh"], env=env, capture_output=True, text=True, check=True)
    argv = out.stdout.splitlines()
    assert argv[:10] == ["--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1", "--master-addr", "node-a",
                         "--master-port", "29500"]
    assert argv[10] == "/opt/megatron/pretrain_gpt.py" and argv[11] == "--mock-data"
    args = json.loads((tmp_path / "x" / "args.json").read_text())
    assert argv[12:] == args
    assert shlex.split((tmp_path / "x" / "args.txt").read_text()) == args
    env.pop("NODE_RANK")
    out = subprocess.run(["bash", tmp_path / "x" / "slurm.sbatch"], env={**env, "SLURM_SUBMIT_DIR": str(tmp_path / "x"),
                         "SLURM_JOB_NODELIST": "node-[a-b]"}, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    ranks = [lines[i + 1] for i, x in enumerate(lines) if x == "--node-rank"]
    assert ranks == ["0", "1"] and lines.count("node-a") == 2
    text = (tmp_path / "x" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text


def test_a_hand_written_megatron_launch_predicts_like_the_same_options(capsys, tmp_path):
    """Megatron SC21's GPT-3 175B recipe (Narayanan et al., Table 1 row: 1,536 GPUs... here 1,024 A100s, tp 8,
    pp 16, interleaved with 3 layers per virtual stage) written as pretrain_gpt.py flags, against
    `meshplan estimate` given the same configuration."""
    line = ("--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 "
            "--max-position-embeddings 2048 --vocab-size 51200 --tensor-model-parallel-size 8 "
            "--pipeline-model-parallel-size 16 --num-layers-per-virtual-pipeline-stage 3 --micro-batch-size 1 "
            "--global-batch-size 1536 --sequence-parallel --recompute-granularity selective --bf16 "
            "--use-distributed-optimizer --overlap-grad-reduce --attention-backend flash "
            "--tokenizer-type GPT2BPETokenizer --data-path /data/my-gpt3_00_text_document --lr 6e-5")
    (tmp_path / "train.sh").write_text(line + "\n")
    r = run_cli(capsys, "estimate", "--from", tmp_path / "train.sh", "-c", "dgx-a100-80gb", "--nodes", "128",
                "--json")
    assert r.code == 0, r.err
    got = r.json()
    r = run_cli(capsys, "estimate", "-m", "gpt3-175b", "-c", "dgx-a100-80gb", "--nodes", "128", "-b", "1536",
                "--tp", "8", "--pp", "16", "--vpp", "2", "--schedule", "interleaved", "--sp", "--zero", "1",
                "--recompute", "selective", "--layers-per-stage", ",".join(["3"] * 32), "--engine", "megatron",
                "--json")
    want = r.json()
    assert got["config"] == want["config"]
    # gpt3-175b's preset has dropout 0.1, Megatron's default: the same model, so the same prediction
    assert got["predicted"]["step_time_s"] == pytest.approx(want["predicted"]["step_time_s"], rel=1e-12)
    assert got["predicted"]["peak_reserved_bytes"] == want["predicted"]["peak_reserved_bytes"]


def test_plan_compare_ranks_a_launch(capsys, tmp_path):
    plan = make_test_plan("gpt_pipe_zero1")
    write_export(export_plan(plan, "megatron"), tmp_path / "job")
    base = ["-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--nodes", "1", "-b", "64", "--seq", "2048"]
    r = run_cli(capsys, "plan", *base, "--compare", tmp_path / "job")
    assert r.code == 0, r.err
    assert "your configuration tp1 pp2 dp4 mbs2 z1 full" in r.out and "ranks #" in r.out
    step = plan.predicted.step_time_s
    shown = f"{step * 1e3:.1f} ms" if step < 1 else f"{step:.2f} s"
    assert f"step {shown}" in r.out
    r = run_cli(capsys, "plan", *base[:-2], "--seq", "1024", "--compare", tmp_path / "job")
    assert r.code == 2 and "sequence length" in r.err


@pytest.mark.parametrize("extra,field", [
    (["--tp", "2"], "--tp"),                                   # the launch sets the degrees
    (["--global-batch", "128"], "--global-batch"),             # disagrees with the launch
    (["--nodes", "2"], "--nodes"),                             # launch.sh runs 1 node
    (["--model", "gpt3-2.7b"], "--model"),                     # another shape than the arguments
])
def test_estimate_from_disagreements_are_one_line_errors(capsys, tmp_path, extra, field):
    write_export(export_plan(make_test_plan("gpt_dense"), "megatron"), tmp_path)
    r = run_cli(capsys, "estimate", "--from", tmp_path, "-c", "dgx-a100-80gb", *extra)
    assert r.code == 2, (r.out, r.err)
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.err


def test_estimate_from_bad_launches_are_one_line_errors(capsys, tmp_path):
    write_export(export_plan(make_test_plan("gpt_pipe_zero1"), "deepspeed"), tmp_path / "ds")
    cases = [
        ([tmp_path / "ds"], "--model"),                                       # ds_config has no model
        ([tmp_path / "ds", "--model", "gpt3-1.3b"], "--seq"),                 # ... nor a sequence length
        ([tmp_path / "nothing"], "--from"),
    ]
    (tmp_path / "moe.txt").write_text("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 128 "
                                      "--vocab-size 512 --micro-batch-size 1 --num-experts 8\n")
    cases.append(([tmp_path / "moe.txt"], "bias-free experts"))     # Megatron's default biases on the experts
    (tmp_path / "bad.json").write_text("[1, 2")
    cases.append(([tmp_path / "bad.json"], "not valid JSON"))
    (tmp_path / "noshape.txt").write_text("--tensor-model-parallel-size 2 --micro-batch-size 1\n")
    cases.append(([tmp_path / "noshape.txt"], "--num-layers"))
    (tmp_path / "ds2.json").write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 3,
                                                   "gradient_accumulation_steps": 2}))
    cases.append(([tmp_path / "ds2.json", "-m", "gpt3-1.3b", "--seq", "2048"], "train_batch_size"))
    for args, field in cases:
        r = run_cli(capsys, "estimate", "--from", *args, "-c", "dgx-a100-80gb", "--nodes", "1")
        assert r.code == 2, (args, r.out, r.err)
        lines = [x for x in r.err.splitlines() if x.strip()]
        assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.err, (args, r.err)


@pytest.mark.parametrize("stages,layers,first,last,want", [
    # hand-worked: 32 + 1 + 1 = 34 effective layers over 4 stages: 9, 9, 8, 8, less the embedding and the head
    (4, 32, 1, 1, [8, 9, 8, 7]),
    (2, 6, 1, 1, [3, 3]),
    (8, 32, 1, 1, [4, 5, 4, 4, 4, 4, 4, 3]),   # 34 = 5, 5, 4 x 6
])
def test_torchtitan_default_split(stages, layers, first, last, want):
    assert default_split(stages, layers, first, last) == want


@pytest.mark.parametrize("ds,want", [
    # DeepSpeed's rule: train_batch_size = micro batch x gradient accumulation x data-parallel size, the
    # missing one derived (accumulation 1 when only the train batch is given); 8 GPUs, no pipeline
    ({"train_batch_size": 64}, (8, 8, 1)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, (8, 2, 4)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, (8, 2, 3)),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
      "pipeline": {"stages": 2}}, (4, 2, 2)),
])
def test_deepspeed_batch_rule(ds, want):
    from planner.export.deepspeed import read
    launch = read(ds, "ds_config.json", 8)
    dp, mbs, gas = want
    assert (launch.config.dp, launch.config.mbs, launch.global_batch // (mbs * dp)) == (dp, mbs, gas)
    assert launch.config.tp * launch.config.pp * launch.config.dp == 8


def test_a_deepspeed_autoep_config_must_route_like_the_model_given(capsys, tmp_path):
    """ds_config carries no model, but AutoEP's top-k and router must be the --model's."""
    plan = make_test_plan("mixtral_ep_zero3", engine="deepspeed")
    write_export(export_plan(plan, "deepspeed"), tmp_path)
    for model, message in (("qwen3-30b-a3b", "top-2 with a softmax router; qwen3-30b-a3b has top-8"),
                           ("llama3-8b", "llama3-8b has no experts")):
        r = run_cli(capsys, "estimate", "--from", tmp_path, "--cluster", "dgx-h100", "--model", model,
                    "--seq", "2048")
        lines = [x for x in r.err.splitlines() if x.strip()]
        assert r.code == 2 and len(lines) == 1 and message in lines[0] and "--model" in lines[0], r.err


def test_megatron_moe_overlaps_are_read_with_a_note_and_gemma_blocks_are_refused(capsys, tmp_path):
    plan = make_test_plan("qwen3_moe_ep", engine="megatron")
    items = json.loads(export_plan(plan, "megatron").files["args.json"])
    (tmp_path / "args.json").write_text(json.dumps(items + ["--moe-shared-expert-overlap"]))
    r = run_cli(capsys, "estimate", "--from", tmp_path / "args.json", "--cluster", "dgx-h100", "--nodes", "2",
                "--json")
    assert r.code == 0 and "note: --moe-shared-expert-overlap is modelled without that overlap" in r.err
    assert r.json()["predicted"]["step_time_s"] == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    from planner.presets import PRESETS
    from planner.export.megatron import nearest
    with pytest.raises(Exception, match="does not write sandwich_norm"):
        nearest(plan.model_copy(update={"model": PRESETS["gemma2-9b"]}))


def test_torchtitan_moe_launches_meshplan_does_not_model_are_refused(capsys, tmp_path):
    """torchtitan's EP borrows TP ranks and has no expert TP; meshplan's experts are tensor-parallel: refused."""
    plan = make_test_plan("qwen3_moe_fsdp", engine="torchtitan")
    items = json.loads(export_plan(plan, "torchtitan").files["args.json"])
    i = items.index("--parallelism.tensor_parallel_degree")
    items[i + 1] = "2"
    items[items.index("--parallelism.data_parallel_shard_degree") + 1] = "8"
    (tmp_path / "args.json").write_text(json.dumps(items))
    r = run_cli(capsys, "estimate", "--from", tmp_path / "args.json", "--cluster", "dgx-h100", "--nodes", "2")
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert r.code == 2 and len(lines) == 1 and "no expert tensor parallelism" in lines[0], r.err
