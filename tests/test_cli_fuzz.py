"""No input hangs or crashes the CLI: a few hundred mutated commands (tests/cli_fuzz.py) each answer with exit
0, 2 or 3 within the time limit, no traceback, and one line on stderr for exit 2. `scripts/fuzz_cli.py` runs
thousands of them."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli_fuzz import cases, make_files, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("fuzz"))


@given(data=st.data())
@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
def test_every_mutated_command_answers_cleanly(files, data):
    argv, must_fail = data.draw(cases(files))
    outcome = run_case(argv)
    assert not outcome.problems(must_fail), (argv, outcome.problems(must_fail), outcome.err[-2000:])


@pytest.mark.parametrize("argv,field", [
    (["estimate", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--global-batch", "99999999999999999999"],
     "--global-batch"),
    (["plan", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--nodes", "99999999999999999999", "-b", "8"], "--nodes"),
    (["plan", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--global-batch", "100000000"], "--global-batch"),
    (["plan", "-m", "gpt3-1.3b", "-c", "dgx-a100-80gb", "--nodes", "40000", "-b", "8"], "--nodes"),
])
def test_the_reported_hangs_are_one_line_errors(argv, field):
    """issue 9's three commands (60 s and more before) and a world too large: exit 2 at once, naming the
    option and its range."""
    outcome = run_case(argv, time_limit_s=10)
    assert outcome.code == 2 and not outcome.problems(), (outcome.err, outcome.problems())
    assert outcome.err.startswith(f"error: {field}: ")
