"""Point-to-point latency and bandwidth of every ordered pair of ranks, measured in parallel rounds.

The pairs follow a round-robin tournament (the circle method): N-1 rounds for N ranks (N when N is odd),
each a set of disjoint pairs that measure at the same time, so the whole matrix costs N-1 pair-tests of
time rather than N(N-1)/2, and every link is measured while the others carry traffic, as in training.
In a round, pair (a, b) measures a -> b and b -> a: the sender sends M bytes and waits for a 4-byte
acknowledgement, at every message size (`measure_pair`); `profiler.fit.fit_alpha_beta` turns the
round-trip times into the latency and bandwidth of that direction.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from profiler.fit import consistent
from profiler.timer import synchronize

ACK_BYTES = 4


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """A round-robin tournament of n players by the circle method: n-1 rounds (n when n is odd, one
    player resting each round) of disjoint pairs (a < b); every unordered pair meets exactly once."""
    if n < 2:
        return []
    players: list[int | None] = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = players[i], players[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        players = [players[0], players[-1]] + players[1:-1]
    return rounds


def _iters_for(nbytes: int, small: int = 1 << 16) -> int:
    """Round trips per timed sample: a few for small messages, whose time is near the clock's grain."""
    return 3 if nbytes <= small else 1


def measure_pair(a: int, b: int, rank: int, sizes: list[int], device: torch.device, reps: int = 10,
                 warmup: int = 2, retries: int = 4, asymmetry: float = 1.5) -> dict[str, list[float]]:
    """Round-trip seconds (M bytes one way, a 4-byte acknowledgement back) for the direction this rank
    sends, per size: {"src->dst": [seconds per size]}. Both ranks of the pair call it.

    Samples interleave sizes and directions (for each repetition: every size, both directions), so a
    burst of host noise lands on all of them alike rather than on one size or one direction. Each value
    is the minimum over repetitions of the mean round trip of a sample: the link's time with the least
    interference from the host (process scheduling, and on virtual machines the wake-up of halted
    cores, which on a shared CPU adds milliseconds to a fraction of the samples).

    Host noise comes in bursts that can outlast a pass. So when a direction's times do not grow with
    size, or the two directions of the pair differ by more than `asymmetry` times at some size, the pair
    measures again (up to `retries` more passes, keeping the minimum): both directions of a link are
    nearly always alike, so a gap usually means a disturbed sample, while a real asymmetry survives the
    repeats and is reported as measured.
    """
    peer = b if rank == a else a
    ack = torch.zeros(ACK_BYTES, dtype=torch.uint8, device=device)
    bufs = {m: torch.zeros(m, dtype=torch.uint8, device=device) for m in sizes}
    best = {(src, m): float("inf") for src in (a, b) for m in sizes}

    def one_pass(reps_: int, warmup_: int) -> None:
        for rep in range(warmup_ + reps_):
            for m in sizes:
                buf, iters = bufs[m], _iters_for(m)
                for src in (a, b):
                    synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        if rank == src:
                            dist.send(buf, peer)
                            dist.recv(ack, peer)
                        else:
                            dist.recv(buf, peer)
                            dist.send(ack, peer)
                    synchronize(device)
                    if rep >= warmup_ and rank == src:
                        best[(src, m)] = min(best[(src, m)], (time.perf_counter() - t0) / iters)

    one_pass(reps, warmup)
    for _ in range(retries):
        # both ends exchange their direction's times and take the same decision
        mine = torch.tensor([best[(rank, m)] for m in sizes], dtype=torch.float64, device=device)
        theirs = torch.zeros_like(mine)
        if rank == a:
            dist.send(mine, peer)
            dist.recv(theirs, peer)
        else:
            dist.recv(theirs, peer)
            dist.send(mine, peer)
        if settled(sizes, mine.tolist(), theirs.tolist(), asymmetry):
            break
        one_pass(reps, 0)
    return {f"{rank}->{peer}": [best[(rank, m)] for m in sizes]}


def settled(sizes: list[int], forward: list[float], backward: list[float], asymmetry: float) -> bool:
    """Whether a pair's measurement needs no repeat: both directions' times grow with size, and at no
    size do the two directions differ by more than `asymmetry` times."""
    if not (consistent(sizes, forward) and consistent(sizes, backward)):
        return False
    return all(max(f, b) <= asymmetry * min(f, b) for f, b in zip(forward, backward))


def measure_round(pairs: list[tuple[int, int]], rank: int, sizes: list[int], device: torch.device,
                  reps: int = 10) -> dict[str, list[float]]:
    """This rank's part of one round: {"src->dst": round-trip seconds per size} for the direction it
    sends; ranks resting this round (odd N) return an empty dict."""
    for a, b in pairs:
        if rank in (a, b):
            return measure_pair(a, b, rank, sizes, device, reps)
    return {}
