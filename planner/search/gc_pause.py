"""Python's cyclic garbage collector paused for the length of a search.

The cost model caches tens of thousands of small objects during a search and creates no reference cycles
worth collecting; the collector's full passes over them took 10-30% of the search's CPU time (measured on
the GPT-1T and Qwen3-235B cases of scripts/bench_search.py and bench_moe_search.py). Reference counting
still frees everything as usual; the collector resumes, and runs, when the block ends.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block (unless already disabled) and restore it after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
