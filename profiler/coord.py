"""Keeping a multi-process profiling run in step, and ending it with a message that names the rank at fault.

A run is a sequence of steps that every rank takes in the same order. Each rank posts where it is
(`<step index>|run|<label>` while measuring, `|wait|` once done and waiting for the others) to the
rendezvous store that torchrun already runs, and a watchdog thread gives each step a deadline:

* a rank whose measurement raises reports "rank R (host) failed in <step>: <error>" and exits;
* a rank still measuring when its deadline passes while the others wait reports itself as hung;
* a rank that finds a peer gone (a collective errors, or its own deadline passes while waiting) names
  the ranks behind it: those at an earlier step, or still measuring the step it waits on.

A rank that diagnoses a failure writes a line to stderr and to the error file (when one is given), and
the process exits with code 1 so that torchrun ends the others. Ranks waiting on others get a grace
period past the step's timeout so that the rank at fault reports first.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

EXIT_FAILED = 1


class StepFailed(Exception):
    """Raised (and reported) when a step cannot complete on this rank."""


def _store_client(timeout_s: float):
    """A new client of torchrun's rendezvous store, in this run's key namespace."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"meshplan-profile/{run}/", store)


class Coordinator:
    """Steps with deadlines and failure reports for one rank (see the module docstring)."""

    def __init__(self, rank: int, world: int, step_timeout_s: float, error_file: str | None = None,
                 barrier_group=None):
        self.rank, self.world = rank, world
        self.host = socket.gethostname()
        self.step_timeout_s = step_timeout_s
        self.error_file = error_file
        self.barrier_group = barrier_group
        self.index = 0
        self._label = "start"
        self._phase = "run"
        self._deadline = float("inf")
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._store = _store_client(30.0)
        self._watch_store = _store_client(30.0)
        self._store.set(f"host/{rank}", self.host)
        self._post("run")
        self._thread = threading.Thread(target=self._watch, name="meshplan-profile-watchdog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ posting and reading positions
    def _post(self, phase: str) -> None:
        self._phase = phase
        self._store.set(f"pos/{self.rank}", f"{self.index}|{phase}|{self._label}")

    def _positions(self, store) -> dict[int, tuple[int, str, str]]:
        out = {}
        for r in range(self.world):
            try:
                if store.check([f"pos/{r}"]):
                    idx, phase, label = store.get(f"pos/{r}").decode().split("|", 2)
                    out[r] = (int(idx), phase, label)
            except Exception:
                continue
        return out

    def _errors(self, store) -> list[str]:
        out = []
        for r in range(self.world):
            try:
                if store.check([f"error/{r}"]):
                    out.append(store.get(f"error/{r}").decode())
            except Exception:
                continue
        return out

    def _hostname(self, store, r: int) -> str:
        try:
            return store.get(f"host/{r}").decode() if store.check([f"host/{r}"]) else "?"
        except Exception:
            return "?"

    # ------------------------------------------------------------------ diagnosis and exit
    def culprits(self, store) -> tuple[list[int], str]:
        """Ranks behind this one (an earlier step, or still measuring this one while this rank waits),
        and a phrase saying where they are."""
        pos = self._positions(store)
        missing = [r for r in range(self.world) if r not in pos]
        behind = sorted(r for r, (idx, phase, _) in pos.items()
                        if r != self.rank and (idx < self.index or (idx == self.index and phase == "run"
                                                                    and self._phase == "wait")))
        if behind or missing:
            where = "; ".join(f"rank {r} in '{pos[r][2]}'" for r in behind[:8])
            return sorted(behind + missing), where
        if self._phase == "run":
            return [self.rank], f"rank {self.rank} in '{self._label}'"
        return [], ""

    def _report(self, line: str, root_cause: bool) -> None:
        """Print `line` (root causes on every rank that has one; consequences on rank 0 alone, and only
        when no rank has reported a root cause) and append it to the error file."""
        store = self._watch_store if threading.current_thread() is self._thread else self._store
        if root_cause:
            try:
                store.set(f"error/{self.rank}", line)
            except Exception:
                pass
        else:
            time.sleep(1.0)   # let the rank at fault report first
            try:
                if self._errors(store) or self.rank != 0:
                    return
            except Exception:
                if self.rank != 0:
                    return
        print(f"meshplan profile: {line}", file=sys.stderr, flush=True)
        if self.error_file:
            try:
                with open(self.error_file, "a") as f:
                    f.write(f"failed\t{line}\n")
            except OSError:
                pass

    def fail(self, line: str, root_cause: bool) -> None:
        """Report and end this process (exit code 1); torchrun then ends the other ranks."""
        try:
            self._report(line, root_cause)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILED)

    def _diagnose_stall(self, store, waited_s: float) -> tuple[str, bool]:
        ranks, where = self.culprits(store)
        if ranks == [self.rank]:
            return (f"rank {self.rank} ({self.host}) hung in '{self._label}': no result after "
                    f"{waited_s:.0f} s (--timeout)", True)
        if ranks:
            hosts = ", ".join(f"{r} ({self._hostname(store, r)})" for r in ranks[:8])
            more = f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
            return (f"rank(s) {hosts}{more} did not finish '{self._label}' within {waited_s:.0f} s "
                    f"(hung or died){': ' + where if where else ''}", False)
        return (f"all ranks stalled in '{self._label}' for {waited_s:.0f} s (a collective that never "
                f"completed)", False)

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                deadline, started = self._deadline, self._started
            if time.monotonic() > deadline:
                line, root = self._diagnose_stall(self._watch_store, time.monotonic() - started)
                self.fail(line, root)

    # ------------------------------------------------------------------ steps
    @contextmanager
    def step(self, label: str, timeout_s: float | None = None):
        """Run one step: a deadline while measuring, a barrier with every rank afterwards.

        An exception in the body is reported as this rank's failure; a communication error (a peer
        gone) is reported naming the ranks behind.
        """
        timeout = timeout_s or self.step_timeout_s
        grace = max(5.0, 0.25 * timeout)
        with self._lock:
            self._label = label
            self._started = time.monotonic()
            self._deadline = self._started + timeout
        self._post("run")
        try:
            yield
        except Exception as exc:   # noqa: BLE001 - every failure of a measurement ends the run, named
            if _is_comm_error(exc):
                line, root = self._diagnose_stall(self._store, time.monotonic() - self._started)
                if root:   # this rank was measuring and its peer vanished: name the peers instead
                    line = (f"rank {self.rank} ({self.host}) lost its peers in '{label}': "
                            f"{_one_line(exc)}")
                self.fail(line, False)
            self.fail(f"rank {self.rank} ({self.host}) failed in '{label}': {_one_line(exc)}", True)
        with self._lock:
            self._deadline = self._started + timeout + grace
        self._post("wait")
        try:
            dist.barrier(group=self.barrier_group)
        except Exception as exc:   # noqa: BLE001
            line, _ = self._diagnose_stall(self._store, time.monotonic() - self._started)
            self.fail(line if "did not finish" in line else f"{line} ({_one_line(exc)})", False)
        with self._lock:
            self._deadline = float("inf")
        self.index += 1

    def close(self) -> None:
        with self._lock:
            self._deadline = float("inf")


def _is_comm_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("connection", "gloo", "nccl", "timed out", "timeout", "peer", "socket",
                                   "distbackenderror", "broken pipe"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    where = traceback.extract_tb(exc.__traceback__)
    loc = f" at {os.path.basename(where[-1].filename)}:{where[-1].lineno}" if where else ""
    return f"{type(exc).__name__}: {first[:300]}{loc}"
