"""Keeping a multi-process profiling run in step, and ending it with a message that names the rank at fault.

A run is a sequence of steps that every rank takes in the same order. Each rank posts where it is
(`<step index>|run|<label>` while measuring, `|wait|` once done and waiting for the others at the step's
barrier) to the rendezvous store torchrun already runs, and a watchdog thread gives each step a deadline
(`--timeout`; collectives have their own, the process group's `--collective-timeout`).

* A rank whose measurement raises reports "rank R (host) failed in <step>: <error>" and exits.
* When a deadline passes, the rank looks at where its main thread is: computing (it is the one hung) or
  inside torch.distributed (waiting on peers); it posts that, and names the ranks at fault: those at an
  earlier step, those still computing in this step, else those that stay silent (hung in native code).
* A collective that errors (a peer gone) is diagnosed the same way.
* A rank that dies outright makes torchrun send SIGTERM to the others; a thread reading the signal's
  wake-up pipe (the main thread may be blocked in a collective) names the silent rank before exiting.

Root causes are printed by the rank concerned; consequences by rank 0 only, and only when no rank has
reported a root cause. Each report is a line on stderr and, when an error file is given (the CLI passes
one), a `failed<TAB>message` line in it. The process then exits with code 1 so torchrun ends the run.
Ranks waiting at a barrier get a grace period past the step's timeout so the rank at fault reports first.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

EXIT_FAILED = 1


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
        self._main_ident = threading.main_thread().ident
        self._lock = threading.Lock()
        self._store = _store_client(30.0)
        self._watch_store = _store_client(30.0)
        self._store.set(f"host/{rank}", self.host)
        self._post("run")
        self._thread = threading.Thread(target=self._watch, name="meshplan-profile-watchdog", daemon=True)
        self._thread.start()
        self._listen_for_termination()

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
    def _main_state(self) -> str:
        """'comm' when the main thread is inside torch.distributed (waiting on peers), else 'compute'."""
        frame = sys._current_frames().get(self._main_ident)
        while frame is not None:
            if "torch/distributed" in frame.f_code.co_filename.replace("\\", "/"):
                return "comm"
            frame = frame.f_back
        return "compute"

    def culprits(self, store, own_state: str, settle_s: float = 2.0) -> list[int]:
        """The ranks holding the run up, as seen from this rank (which may be one of them).

        Each stalled rank posts whether it waits on communication or is still computing. Ranks at an
        earlier step, ranks that never posted a position, and ranks computing in the step this rank is
        stuck in are at fault; failing those, the ranks of this step that stay silent (hung in native code
        or dead). An empty list means every rank waits in communication (a collective that never
        completes).
        """
        store.set(f"stall/{self.rank}", f"{self.index}|{own_state}")
        if own_state == "compute" and self._phase == "run":
            return [self.rank]
        deadline = time.monotonic() + settle_s
        while True:
            pos = self._positions(store)
            same = [r for r, (idx, phase, _) in pos.items()
                    if r != self.rank and idx == self.index and phase == "run"]
            states = {}
            for r in same:
                try:
                    if store.check([f"stall/{r}"]):
                        idx, state = store.get(f"stall/{r}").decode().split("|", 1)
                        if int(idx) == self.index:
                            states[r] = state
                except Exception:
                    continue
            if len(states) == len(same) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        behind = [r for r, (idx, _, _) in pos.items() if idx < self.index]
        missing = [r for r in range(self.world) if r not in pos]
        computing = [r for r, state in states.items() if state == "compute"]
        found = sorted(set(behind + missing + computing))
        return found or sorted(r for r in same if r not in states)

    def _report(self, line: str, root_cause: bool, store=None) -> None:
        """Print `line` (root causes on every rank that has one; consequences on rank 0 alone, and only
        when no rank has reported a root cause) and append it to the error file."""
        if store is None:
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

    def fail(self, line: str, root_cause: bool, store=None) -> None:
        """Report and end this process (exit code 1); torchrun then ends the other ranks."""
        try:
            self._report(line, root_cause, store)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILED)

    def _diagnose_stall(self, store, waited_s: float, own_state: str) -> tuple[str, bool]:
        """One line naming the ranks at fault, and whether this rank is the one."""
        ranks = self.culprits(store, own_state)
        if ranks == [self.rank]:
            return (f"rank {self.rank} ({self.host}) hung in '{self._label}': no result after "
                    f"{waited_s:.0f} s (--timeout)", True)
        if ranks:
            pos = self._positions(store)
            names = ", ".join(f"{r} ({self._hostname(store, r)}"
                              f"{', in ' + repr(pos[r][2]) if r in pos and pos[r][0] != self.index else ''})"
                              for r in ranks[:8])
            more = f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
            return (f"rank(s) {names}{more} did not finish '{self._label}' within {waited_s:.0f} s "
                    f"(hung or died)", False)
        return (f"all ranks stalled in '{self._label}' for {waited_s:.0f} s, waiting in communication "
                f"(a collective or transfer that never completed)", False)

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                deadline, started = self._deadline, self._started
            if time.monotonic() > deadline:
                line, root = self._diagnose_stall(self._watch_store, time.monotonic() - started,
                                                  self._main_state())
                self.fail(line, root)

    def _listen_for_termination(self) -> None:
        """When one worker dies, torchrun sends SIGTERM to the others at once: report which rank stopped
        before going. The signal is caught through a wake-up pipe read by a thread of its own, because the
        main thread may be blocked in a collective where no Python signal handler would run."""
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.set_wakeup_fd(write_fd)

        def listen() -> None:
            while True:
                data = os.read(read_fd, 16)
                if signal.SIGTERM in data:
                    break
            store = _store_client(10.0)
            ranks = self.culprits(store, "comm")
            who = ", ".join(f"{r} ({self._hostname(store, r)})" for r in ranks[:8]) or "another rank"
            self.fail(f"rank(s) {who} stopped during '{self._label}' (died or killed); torchrun ended the run",
                      False, store)

        threading.Thread(target=listen, name="meshplan-profile-sigterm", daemon=True).start()

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
                line, _ = self._diagnose_stall(self._store, time.monotonic() - self._started, "comm")
                self.fail(f"{line} [rank {self.rank}: {_one_line(exc)}]", False)
            self.fail(f"rank {self.rank} ({self.host}) failed in '{label}': {_one_line(exc)}", True)
        with self._lock:
            self._deadline = self._started + timeout + grace
        self._post("wait")
        try:
            dist.barrier(group=self.barrier_group)
        except Exception as exc:   # noqa: BLE001
            line, _ = self._diagnose_stall(self._store, time.monotonic() - self._started, "comm")
            self.fail(f"{line} [rank {self.rank}: {_one_line(exc)}]", False)
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
