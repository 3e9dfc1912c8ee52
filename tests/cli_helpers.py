"""Run the meshplan CLI in-process and capture what it prints and its exit code."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from planner.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> Result:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(exc.value.code if isinstance(exc.value.code, int) else 1, captured.out, captured.err)
