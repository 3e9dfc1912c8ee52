"""The layer split against brute force over every contiguous split."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from planner.partition import partition_layers


def brute_force(layers, block_time, extra, per_block, base, capacity):
    """min over all compositions of `layers` into len(extra) positive parts of the slowest stage, subject to
    every stage's memory; None if none fits."""
    stages = len(extra)
    best = None

    def rec(j, left, counts):
        nonlocal best
        if j == stages - 1:
            split = counts + [left]
            if left < 1 or any(n * per_block[i] + base[i] > capacity for i, n in enumerate(split)):
                return
            worst = max(n * block_time + extra[i] for i, n in enumerate(split))
            if best is None or worst < best:
                best = worst
            return
        for n in range(1, left - (stages - j - 1) + 1):
            rec(j + 1, left - n, counts + [n])

    rec(0, layers, [])
    return best


@given(layers=st.integers(1, 14), stages=st.integers(1, 5), block=st.floats(0.5, 2.0),
       extra=st.lists(st.floats(0, 6), min_size=5, max_size=5), per=st.lists(st.floats(1, 4), min_size=5, max_size=5),
       base=st.lists(st.floats(0, 10), min_size=5, max_size=5), cap=st.floats(5, 60) | st.just(math.inf))
@settings(max_examples=300, deadline=None)
def test_partition_is_the_brute_force_optimum(layers, stages, block, extra, per, base, cap):
    extra, per, base = extra[:stages], per[:stages], base[:stages]
    split = partition_layers(layers, block, extra, per, base, cap)
    expected = brute_force(layers, block, extra, per, base, cap)
    if expected is None:
        assert split is None
        return
    assert split is not None and sum(split) == layers and min(split) >= 1
    assert all(n * per[i] + base[i] <= cap for i, n in enumerate(split))
    assert max(n * block + extra[i] for i, n in enumerate(split)) == expected
