"""Training data: the global batch of step k, the same in every layout.

Each step draws `global_batch` sequences of `seq_len + 1` tokens (inputs are the first seq_len tokens,
targets the last seq_len) from a generator seeded by (seed, step) alone; data-parallel rank r takes rows
[r * B/dp, (r + 1) * B/dp) and splits them into micro-batches in order. So any (tp, pp, dp, mbs) sees the
same sequences at the same step, and a resumed run continues with the same batches.

Sources: synthetic (default) or a flat binary file of uint16 / uint32 token ids (the nanoGPT and
Megatron-LM `.bin` convention), memory-mapped and read at random offsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planner.errors import InputError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SAMPLE_TOKENS = 1 << 20          # tokens read from a data file to check its ids before training


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def synthetic_batch(seed: int, step: int, batch: int, seq_len: int, vocab: int) -> np.ndarray:
    """[batch, seq_len + 1] int64 token ids: each row an arithmetic progression modulo the vocabulary
    (random start and stride 1-7) with 10% of the tokens replaced by random ones, so that the loss can
    fall below log(V) and different steps see different sequences."""
    rng = _rng(seed, step)
    start = rng.integers(0, vocab, size=(batch, 1))
    stride = rng.integers(1, 8, size=(batch, 1))
    tokens = (start + stride * np.arange(seq_len + 1)[None, :]) % vocab
    noise = rng.random((batch, seq_len + 1)) < 0.1
    tokens = np.where(noise, rng.integers(0, vocab, size=(batch, seq_len + 1)), tokens)
    return tokens.astype(np.int64)


def check_data_file(path: str | Path, dtype: str, seq_len: int, vocab: int) -> int:
    """Validate a token file before any training; returns its length in tokens. InputError (exit 2) when
    it is missing, not a whole number of `dtype` elements, shorter than one sequence, or holds ids outside
    the vocabulary (in its first 1 Mi tokens) — including the telltale of uint32 ids read as uint16."""
    p = Path(path)
    if dtype not in DTYPES:
        raise InputError(f"'{dtype}' is not one of {', '.join(DTYPES)}", field="--data-dtype")
    if not p.is_file():
        raise InputError(f"no such file '{p}'", field="--data")
    item = np.dtype(DTYPES[dtype]).itemsize
    size = p.stat().st_size
    if size % item:
        raise InputError(f"'{p}' has {size} bytes, not a whole number of {dtype} tokens ({item} bytes each); "
                         f"is --data-dtype right?", field="--data")
    n = size // item
    if n < seq_len + 1:
        raise InputError(f"'{p}' holds {n} tokens; one training sequence needs seq_len + 1 = {seq_len + 1}",
                         field="--data")
    sample = np.asarray(np.memmap(p, dtype=DTYPES[dtype], mode="r", shape=(min(n, SAMPLE_TOKENS),)))
    if dtype == "uint16" and sample.size >= 64 and not sample[1::2].any() and sample[0::2].any():
        raise InputError(f"'{p}' looks like uint32 token ids (every other uint16 is zero); pass "
                         f"--data-dtype uint32", field="--data")
    top = int(sample.max())
    if top >= vocab:
        hint = " (uint16 ids read as uint32?)" if dtype == "uint32" and top >= 65536 else ""
        raise InputError(f"'{p}' holds token id {top}, outside the model's vocabulary of {vocab}{hint}; is "
                         f"--data-dtype right?", field="--data")
    return n


class TokenData:
    """The global batch of a step: synthetic, or windows of a memory-mapped token file."""

    def __init__(self, seed: int, global_batch: int, seq_len: int, vocab: int, path: str | None = None,
                 dtype: str = "uint16"):
        self.seed, self.batch, self.seq_len, self.vocab = seed, global_batch, seq_len, vocab
        self.tokens = None
        if path is not None:
            n = check_data_file(path, dtype, seq_len, vocab)
            self.tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r", shape=(n,))

    def global_batch(self, step: int) -> np.ndarray:
        """[global_batch, seq_len + 1] int64 token ids of `step` (1-based)."""
        if self.tokens is None:
            return synthetic_batch(self.seed, step, self.batch, self.seq_len, self.vocab)
        last_start = len(self.tokens) - (self.seq_len + 1)
        starts = _rng(self.seed, step).integers(0, last_start + 1, size=self.batch)
        rows = [np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return np.stack(rows)

    def local_batch(self, step: int, dp_rank: int, dp: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one data-parallel rank: rows [r * B/dp, (r + 1) * B/dp), [B/dp, seq_len]."""
        rows = self.batch // dp
        tokens = self.global_batch(step)[dp_rank * rows:(dp_rank + 1) * rows]
        return tokens[:, :-1], tokens[:, 1:]
