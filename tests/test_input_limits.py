"""Documented ranges for every number, divisors without counting, and a search space whose size does not grow
with a number's value."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import typer

from planner.cli import app, register_commands
from planner.errors import InputError
from planner.limits import OPTIONS, check_spec
from planner.loaders import load_cluster, load_model
from planner.presets import PRESETS
from planner.search.space import Constraints, enumerate_space
from planner.specs import ModelSpec, TrainingSpec
from planner.validate import divisors, prime_factors
from tests.cli_helpers import run_cli


def test_divisors_equal_brute_force_and_factors_multiply_back():
    for n in list(range(1, 2000)) + [720720, 997920, 1048576, 65521, 262139, 2 ** 31 - 1, 2 ** 20 * 3 ** 5,
                                     999983 * 1000003]:
        product = 1
        for p, k in prime_factors(n).items():
            assert all(p % q for q in range(2, int(p ** 0.5) + 1)), (n, p)      # each factor is prime
            product *= p ** k
        assert product == n
        small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]      # brute force, in pairs d, n / d
        assert divisors(n) == sorted(set(small) | {n // d for d in small}), n


def _cli_options() -> set[str]:
    names = set()
    register_commands()
    for group in (typer.main.get_command(app).commands.values()):
        commands = group.commands.values() if hasattr(group, "commands") else [group]
        for command in commands:
            for param in command.params:
                names.update(param.opts)
    return names


def test_every_documented_range_belongs_to_a_real_option():
    assert set(OPTIONS) <= _cli_options(), set(OPTIONS) - _cli_options()


@pytest.mark.parametrize("field,value", [
    ("num_layers", 10 ** 6), ("hidden_size", 10 ** 30), ("vocab_size", 2 ** 64), ("num_heads", 2 ** 17)])
def test_a_model_file_with_a_number_out_of_range_names_the_field(tmp_path, field, value):
    data = PRESETS["gpt-tiny"].model_dump(mode="json")
    data[field] = value
    if field == "hidden_size":
        data["num_heads"] = 1
    if field == "num_heads":
        data["hidden_size"] = value
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as exc:
        load_model(str(path))
    assert str(exc.value).startswith(f"{path}: {field}: must be in 1..")


def test_cluster_numbers_that_would_break_the_arithmetic_are_refused(tmp_path):
    data = load_cluster("dgx-a100-80gb").model_dump(mode="json")
    gpu = data["nodes"]["gpu_type"]
    for key, value, message in (("peak_flops", {"fp32": 1e-300}, "peak_flops.fp32: must be in"),
                                ("memory_bytes", 10, "memory_bytes: must be in"),
                                ("hbm_bandwidth", 1e300, "hbm_bandwidth: must be in")):
        bad = {**data, "gpu_types": {gpu: {**data["gpu_types"][gpu], key: value}}}
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message.replace(".", r"\.")):
            load_cluster(str(path))
    with pytest.raises(InputError, match="more than the 262,144"):
        load_cluster("dgx-a100-80gb", nodes=40_000)


def test_nested_specs_are_checked_too():
    plan_model = PRESETS["gpt-tiny"].model_copy(update={"max_position_embeddings": 2 ** 30})
    with pytest.raises(InputError, match="plan: max_position_embeddings: must be in 1..16,777,216"):
        check_spec(plan_model, "plan")


def test_rope_needs_an_even_head_dim(capsys, tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"num_layers": 2, "hidden_size": 66, "num_heads": 6, "vocab_size": 100,
                                "position_embedding": "rope"}))
    r = run_cli(capsys, "estimate", "-m", str(path), "-c", "cpu-local", "-b", "8", "--seq", "64")
    assert r.code == 2 and "head_dim 11" in r.err and "must be even" in r.err


def test_interleaved_stages_divide_the_layers_per_stage():
    """Megatron-LM's rule (layers per stage divisible by layers per virtual stage): the virtual stages
    searched for 24 layers on 2 stages are the divisors of 12 from 2 on, and a pinned --vpp is taken as
    given."""
    model = ModelSpec(num_layers=24, hidden_size=1024, num_heads=16, vocab_size=32000)
    cluster = load_cluster("dgx-a100-80gb", nodes=1, gpus_per_node=2)
    training = TrainingSpec(global_batch=8, seq_len=2048)
    pins = Constraints(pp=2, schedule="interleaved")
    vpps = {c.vpp for c in enumerate_space(model, cluster, training, pins, Counter())}
    assert vpps == {2, 3, 4, 6, 12}
    pinned = {c.vpp for c in enumerate_space(model, cluster, training, Constraints(pp=2, vpp=5), Counter())}
    assert pinned == {5}


def test_the_search_space_grows_with_divisors_not_values():
    """9,998 layers on 2 stages: 4,999 layers per stage is prime, so one interleaved choice (v = 4,999) where
    counting v up to the layers per stage would have costed 4,998."""
    model = ModelSpec(num_layers=9_998, hidden_size=1024, num_heads=16, vocab_size=32000)
    cluster = load_cluster("dgx-a100-80gb", nodes=1, gpus_per_node=2)
    training = TrainingSpec(global_batch=8, seq_len=2048)
    pins = Constraints(pp=2, schedule="interleaved")
    assert {c.vpp for c in enumerate_space(model, cluster, training, pins, Counter())} == {4999}


@pytest.mark.parametrize("command,suffix", [
    (["plan", "-m", "llama3-8b", "-c", "dgx-h100", "-b", "32", "--seq", "4096", "--compare"], ".json"),
    (["estimate", "-c", "dgx-h100", "--from"], ".json"),
    (["calibrate", "-c", "dgx-h100", "-o", "{tmp}/out.yaml", "--runs"], ".jsonl"),
])
def test_json_nested_past_the_parser_is_one_line(capsys, tmp_path, command, suffix):
    """A JSON file nested deeper than Python's parser recurses (the CLI fuzz's deep.json) is refused in one line
    naming the option (a RecursionError escaped `plan --compare`)."""
    deep = tmp_path / f"deep{suffix}"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command] + [str(deep)]
    r = run_cli(capsys, *argv)
    assert r.code == 2, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert command[-1] in lines[0] or "nested too deeply" in lines[0], lines[0]
