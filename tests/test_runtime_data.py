"""runtime.data, runtime.checkpoint bookkeeping, runtime.report arithmetic and the training setup (optimizer,
precision recipe), with no processes launched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.errors import InputError
from runtime import checkpoint as ckpt
from runtime.data import TokenData, check_data_file, synthetic_batch
from runtime.report import aggregate_step_time, build_report, error_pct
from tests.runtime_helpers import make_test_plan


def test_synthetic_batches_depend_on_seed_and_step_only():
    a = synthetic_batch(0, 3, 8, 32, 512)
    assert a.shape == (8, 33) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 512
    assert np.array_equal(a, synthetic_batch(0, 3, 8, 32, 512))
    assert not np.array_equal(a, synthetic_batch(0, 4, 8, 32, 512))
    assert not np.array_equal(a, synthetic_batch(1, 3, 8, 32, 512))


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_data_parallel_ranks_split_the_same_global_batch(dp):
    data = TokenData(5, 8, 16, 512)
    whole = data.global_batch(2)
    parts = [data.local_batch(2, r, dp) for r in range(dp)]
    assert np.array_equal(np.concatenate([x for x, _ in parts]), whole[:, :-1])
    assert np.array_equal(np.concatenate([y for _, y in parts]), whole[:, 1:])


def test_token_file_windows_are_slices_of_the_file(tmp_path):
    tokens = (np.arange(10_000) * 7 % 500).astype(np.uint32)      # token i+1 = token i + 7 (mod 500)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = TokenData(1, 4, 16, 512, str(path), "uint32")
    batch = data.global_batch(7)
    assert batch.shape == (4, 17) and batch.dtype == np.int64
    assert np.array_equal((batch[:, :-1] + 7) % 500, batch[:, 1:])
    assert np.array_equal(batch, TokenData(1, 4, 16, 512, str(path), "uint32").global_batch(7))
    assert not np.array_equal(batch, data.global_batch(8))


def _write(path, values, dtype):
    np.asarray(values, dtype=dtype).tofile(path)
    return str(path)


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("odd-bytes", "not a whole number"),
    ("too-short", "one training sequence needs"),
    ("uint32-as-uint16", "looks like uint32"),
    ("out-of-vocab", "outside the model's vocabulary"),
    ("uint16-as-uint32", "uint16 ids read as uint32"),
])
def test_bad_data_files_are_refused(tmp_path, case, match):
    p = tmp_path / "t.bin"
    dtype = "uint16"
    if case == "odd-bytes":
        p.write_bytes(b"\x01" * 101)
    elif case == "too-short":
        _write(p, np.arange(20), np.uint16)
    elif case == "uint32-as-uint16":
        _write(p, np.arange(1000) % 400 + 1, np.uint32)
    elif case == "out-of-vocab":
        _write(p, np.arange(1000) % 600, np.uint16)
    elif case == "uint16-as-uint32":
        _write(p, np.arange(1000) % 400 + 1, np.uint16)
        dtype = "uint32"
    with pytest.raises(InputError, match=match):
        check_data_file(p, dtype, 32, 512)


def test_latest_checkpoint_ignores_partial_and_incomplete(tmp_path):
    def make(name, complete=True):
        d = tmp_path / name
        d.mkdir()
        if complete:
            (d / ".metadata").write_text("x")
            (d / ckpt.INFO_FILE).write_text(json.dumps({"fingerprint": "f", "losses": [1.0]}))
        return d

    make("step_00000002")
    make("step_00000006.partial")          # a save killed before the rename
    make("step_00000005", complete=False)  # no metadata
    assert ckpt.latest(tmp_path) == (2, tmp_path / "step_00000002")
    assert ckpt.check_resumable(tmp_path, "f", 4) == ((2, tmp_path / "step_00000002"), [])
    with pytest.raises(InputError, match="different plan"):
        ckpt.check_resumable(tmp_path, "other", 4)
    with pytest.raises(InputError, match="nothing to run"):
        ckpt.check_resumable(tmp_path, "f", 2)
    with pytest.raises(InputError, match="no complete checkpoint"):
        ckpt.check_resumable(tmp_path / "nowhere", "f", 4)


def _saved(root, step, shards: dict[str, bytes]):
    """A checkpoint as `checkpoint.save` leaves it: its files and meshplan.json listing their sizes and
    SHA-256 (computed here with hashlib directly)."""
    import hashlib
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    for name, data in {**shards, ".metadata": b"meta"}.items():
        (d / name).write_bytes(data)
    files = {name: [len(data), hashlib.sha256(data).hexdigest()] for name, data in {**shards, ".metadata": b"meta"}
             .items()}
    (d / ckpt.INFO_FILE).write_text(json.dumps({"fingerprint": "f", "losses": [1.0] * step, "files": files}))
    return d


def test_damaged_checkpoints_are_passed_over_for_the_newest_intact_one(tmp_path):
    """Truncated, corrupted (same size), with a file missing or an unreadable meshplan.json: each is refused
    with a line naming it and the older intact checkpoint is resumed."""
    good = _saved(tmp_path, 2, {"__0_0.distcp": b"a" * 100, "__1_0.distcp": b"b" * 100})
    truncated = _saved(tmp_path, 4, {"__0_0.distcp": b"a" * 100})
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(40)
    corrupted = _saved(tmp_path, 6, {"__0_0.distcp": b"a" * 100})
    (corrupted / "__0_0.distcp").write_bytes(b"a" * 50 + b"X" + b"a" * 49)
    missing = _saved(tmp_path, 8, {"__0_0.distcp": b"a" * 100, "__1_0.distcp": b"b"})
    (missing / "__1_0.distcp").unlink()
    unreadable = _saved(tmp_path, 10, {"__0_0.distcp": b"a"})
    (unreadable / ckpt.INFO_FILE).write_text('{"fingerprint": "f", "los')
    found, skipped = ckpt.check_resumable(tmp_path, "f", 20)
    assert found == (2, good)
    assert skipped == [
        f"checkpoint '{unreadable}' is damaged (its meshplan.json is unreadable); not used",
        f"checkpoint '{missing}' is damaged (__1_0.distcp is missing); not used",
        f"checkpoint '{corrupted}' is damaged (__0_0.distcp does not have the contents it was saved with "
        f"(corrupted)); not used",
        f"checkpoint '{truncated}' is damaged (__0_0.distcp has 40 bytes, 100 when saved (truncated)); not used"]
    # the ranks, given the checkpoint `meshplan run` verified, check sizes only
    assert ckpt.check_checkpoint(corrupted, "f", 20, verify_contents=False) == (6, corrupted)
    with pytest.raises(InputError, match="is damaged: __0_0.distcp has 40 bytes"):
        ckpt.check_checkpoint(truncated, "f", 20, verify_contents=False)
    (good / "__1_0.distcp").write_bytes(b"c" * 100)
    with pytest.raises(InputError, match="no intact checkpoint in .* to resume from"):
        ckpt.check_resumable(tmp_path, "f", 20)


def test_a_new_run_refuses_the_checkpoints_of_an_earlier_run_unless_resumed_or_forced(tmp_path):
    from runtime.checks import check_run
    from runtime.train import parse_args

    plan = make_test_plan(dp=2)
    root = tmp_path / "ckpt"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / ".metadata").write_text("x")
    (root / "step_00000002" / ckpt.INFO_FILE).write_text(json.dumps({"fingerprint": "f"}))
    (root / "step_00000003.partial").mkdir()
    (root / "notes.txt").write_text("mine")
    base = ["--plan", "plan.json", "--checkpoint-dir", str(root)]
    with pytest.raises(InputError, match="holds checkpoints of an earlier run") as exc:
        check_run(plan, 2, parse_args(base + ["--checkpoint-every", "2"]))
    assert exc.value.field == "--checkpoint-dir"
    # continuing it, starting over, or a run that saves nothing are fine
    for extra in (["--checkpoint-every", "2", "--resume"], ["--checkpoint-every", "2", "--force"], []):
        check_run(plan, 2, parse_args(base + extra))
    ckpt.clear(root)                # what --force does: the checkpoints go, nothing else
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


def test_fingerprint_follows_what_changes_the_numbers():
    plan = make_test_plan(dp=2)
    base = ckpt.fingerprint(plan, 0, 1e-3, None)
    assert base == ckpt.fingerprint(make_test_plan(dp=2), 0, 1e-3, None)
    assert base != ckpt.fingerprint(plan, 1, 1e-3, None)
    assert base != ckpt.fingerprint(plan, 0, 2e-3, None)
    assert base != ckpt.fingerprint(make_test_plan(dp=2, zero=3), 0, 1e-3, None)


def test_fingerprint_names_the_data_file_not_the_path_to_it(tmp_path, monkeypatch):
    """`meshplan run` fingerprints --data as the user typed it, the ranks as the resolved path they are
    given: a relative path, a symlink and the file itself are one file; another file is not."""
    plan = make_test_plan(dp=2)
    data = tmp_path / "tokens.bin"
    np.arange(100, dtype=np.uint16).tofile(data)
    other = tmp_path / "other.bin"
    np.arange(100, dtype=np.uint16).tofile(other)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link.bin"
    link.symlink_to(data)
    monkeypatch.chdir(tmp_path / "sub")
    base = ckpt.fingerprint(plan, 0, 1e-3, str(data))
    for same in ("link.bin", "../tokens.bin", str(link)):
        assert ckpt.fingerprint(plan, 0, 1e-3, same) == base, same
    assert ckpt.fingerprint(plan, 0, 1e-3, str(other)) != base
    assert ckpt.fingerprint(plan, 0, 1e-3, None) != base


def test_report_figures_from_rank_measurements():
    plan = make_test_plan(dp=2)
    ranks = [
        {"rank": 0, "step_times_s": [5.0, 1.0, 2.0, 1.0], "memory_kind": "cpu_peak_rss",
         "peak_memory_bytes": 300, "peak_reserved_bytes": None, "peak_memory_increase_bytes": 100},
        {"rank": 1, "step_times_s": [6.0, 1.5, 1.0, 3.0], "memory_kind": "cpu_peak_rss",
         "peak_memory_bytes": 250, "peak_reserved_bytes": None, "peak_memory_increase_bytes": 120},
    ]
    # slowest rank per step, first step dropped: [1.5, 2.0, 3.0] -> median 2.0
    assert aggregate_step_time(ranks) == 2.0
    report = build_report(plan, {"world_size": 2, "device": "cpu"}, [6.0, 5.9, 5.8, 5.7], ranks)
    m, p, e = report["measured"], report["predicted"], report["error_pct"]
    assert m["step_time_s"] == 2.0
    assert m["tokens_per_s"] == pytest.approx(8 * 32 / 2.0)
    assert m["peak_memory_bytes"] == 300 and m["peak_memory_increase_bytes"] == 120
    assert e["step_time_s"] == pytest.approx(100 * (2.0 - p["step_time_s"]) / p["step_time_s"])
    assert e["peak_memory_bytes"] == pytest.approx(100 * (120 - p["peak_memory_bytes"]) / p["peak_memory_bytes"])
    assert m["mfu"] == pytest.approx(p["mfu"] * p["step_time_s"] / 2.0)
    assert error_pct(None, 1.0) is None and error_pct(1.0, 0.0) is None


def test_rank_layout_placement_decides_which_process_holds_which_coordinate():
    from runtime.rank_layout import rank_grid
    from runtime.parallelize import my_coords

    plan = make_test_plan(tp=2, pp=2, dp=2)
    assert rank_grid(plan) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    # place plan rank r on device 7 - r (as a placement search may): process p holds rank 7 - p's coordinate
    rows = [row.model_copy(update={"local_gpu": 7 - row.rank}) for row in plan.rank_layout]
    moved = plan.model_copy(update={"rank_layout": rows})
    assert rank_grid(moved) == [[[7, 6], [5, 4]], [[3, 2], [1, 0]]]
    for process in range(8):
        row = plan.rank_layout[7 - process]
        c = my_coords(moved, process)
        assert (c.pp, c.dp, c.tp) == (row.pp, row.dp, row.tp)
    clash = [row.model_copy(update={"local_gpu": 0}) if row.rank == 1 else row for row in plan.rank_layout]
    with pytest.raises(InputError, match="device given to another rank"):
        rank_grid(plan.model_copy(update={"rank_layout": clash}))


def test_placements_that_reverse_a_sharded_group_are_refused():
    """torch.distributed numbers a DeviceMesh sub-group's members by process, so DTensor and FSDP2 gather a TP or DP
    group's shards in process order (on gloo a 2-process mesh [1, 0] gathers Shard(0) pieces [0, 1] as [1, 0]):
    `meshplan run` refuses placements that reverse a TP, DP or expert-DP group, and accepts swapped stages."""
    from runtime.checks import check_mesh_order

    plan = make_test_plan(tp=2, pp=2, dp=2)
    check_mesh_order(plan)
    reversed_all = [row.model_copy(update={"local_gpu": 7 - row.rank}) for row in plan.rank_layout]
    with pytest.raises(InputError, match="rank_layout: the tp group of ranks \\[0, 1\\] is placed on processes"):
        check_mesh_order(plan.model_copy(update={"rank_layout": reversed_all}))
    stages_swapped = [row.model_copy(update={"local_gpu": (row.rank + 4) % 8}) for row in plan.rank_layout]
    check_mesh_order(plan.model_copy(update={"rank_layout": stages_swapped}))
    moe = make_test_plan("moe-tiny", dp=4, ep=2)
    ep_swapped = [row.model_copy(update={"local_gpu": [1, 0, 3, 2][row.rank]}) for row in moe.rank_layout]
    with pytest.raises(InputError, match="the dp group"):
        check_mesh_order(moe.model_copy(update={"rank_layout": ep_swapped}))


@pytest.mark.parametrize("precision,config,ran", [
    ("bf16", {"dp": 2, "zero": 1}, "bf16"),       # FSDP2 holds 16-bit parameters
    ("fp16", {"dp": 2, "zero": 3}, "fp16"),
    ("bf16", {"dp": 2, "zero": 0}, "amp-bf16"),   # otherwise autocast over fp32 parameters
    ("bf16", {"tp": 2}, "amp-bf16"),
    ("fp16", {}, "amp-fp16"),
    ("amp-bf16", {"dp": 2, "zero": 3}, "amp-bf16"),
    ("fp32", {"dp": 2, "zero": 1}, "fp32"),
])
def test_the_run_reports_the_precision_recipe_that_ran(precision, config, ran):
    """On a GPU, 16-bit parameters only where FSDP2's mixed-precision policy shards the model; on CPU
    always fp32. (No GPU is needed: the recipe is chosen, not run.)"""
    import torch

    from runtime.train import _precision

    plan = make_test_plan(precision=precision, **config)
    label, policy, _, scaled = _precision(plan, torch.device("cuda"))
    assert label == ran
    assert (policy is not None) == (ran in ("bf16", "fp16"))
    assert scaled == (precision == "fp16")
    assert _precision(plan, torch.device("cpu"))[0] == "fp32"


@pytest.mark.parametrize("kind,cls,settings", [
    ("adamw", "AdamW", {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}),
    ("adam", "Adam", {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}),
    ("sgd", "SGD", {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False}),
])
def test_optimizers_have_the_documented_hyperparameters(kind, cls, settings):
    """The README's settings (--lr row). Over the exactness tests' 4 steps at lr 1e-3 a wrong AdamW weight
    decay moves the loss by less than their tolerance, so it is checked here directly."""
    import torch

    from runtime.train import make_optimizer

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], kind, 0.25)
    assert type(opt).__name__ == cls
    assert opt.defaults["lr"] == 0.25
    for key, value in settings.items():
        assert opt.defaults[key] == value, key


def test_runs_refuse_a_tp_that_cannot_shard_the_mlp_and_pad_the_vocabulary():
    """The MLP width must divide (as in Megatron-LM); a vocabulary of 511 at tp 2 is padded to 512, not
    refused (the losses of padded vocabularies are checked in test_runtime_exactness.py)."""
    from runtime.checks import check_run
    from runtime.train import parse_args

    plan = make_test_plan(tp=2)
    args = parse_args(["--plan", "plan.json"])
    check_run(plan, 2, args)
    check_run(plan.model_copy(update={"model": plan.model.model_copy(update={"vocab_size": 511})}), 2, args)
    bad = plan.model_copy(update={"model": plan.model.model_copy(update={"ffn_hidden_size": 255})})
    with pytest.raises(InputError) as exc:
        check_run(bad, 2, args)
    assert str(exc.value) == "--tp: tp 2 does not divide ffn_hidden_size 255 (valid tp: 1)"
