"""Shared fixtures: paths to the reference data and the repository."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# a copy of ../shared/reference (public tables, each with its source line), so a fresh clone tests alike
REFERENCE = DATA / "reference"


def read_reference_csv(name: str) -> list[dict[str, str]]:
    """Rows of a reference CSV, skipping its leading '#' source line."""
    with open(REFERENCE / name) as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


@pytest.fixture
def reference():
    return read_reference_csv


# Property tests draw the same examples on every run (hypothesis' derandomize): a suite that fails at random
# blocks every submission. `HYPOTHESIS_PROFILE=explore pytest` draws fresh ones to look for new failures.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
