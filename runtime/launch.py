"""Start the ranks with torchrun (`python -m torch.distributed.run`, the interpreter running meshplan) and
follow them: a progress bar from rank 0's progress lines, the ranks' stderr passed through with their rank
prefixed, and on failure the rank that failed first and its last error line. torchrun dies with this
process (SIGTERM, runtime.process), and the ranks with torchrun, so killing `meshplan run` in any way leaves
no process behind.

No torch import here: the parent process only launches and watches.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from runtime.process import child_dies_with_us
from runtime.train import PROGRESS_PREFIX

TRAIN_MODULE = "runtime.train"
RANK_PREFIX = re.compile(r"^\[[^\]]*?(\d+)\]:(.*)$")          # torchrun --tee: "[default3]:text"
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")            # torchrun's failure summary, one entry per rank
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
SUMMARY_ROOT = "Root Cause"


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of a rendezvous endpoint `host:port` (`[address]:port` for IPv6); InputError naming
    --rdzv-endpoint when it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not sep or not host or any(c.isspace() for c in host) or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536):
        raise InputError(f"'{text}' is not host:port (port 1-65535), e.g. node0:29500", field="--rdzv-endpoint")
    return host, int(port)


def torchrun_command(train_args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, python: str | None = None,
                     log_dir: str | None = None) -> list[str]:
    """The torchrun command line of one node. Single node: a standalone rendezvous on a free port, with
    each rank's stderr tee'd (prefixed with its rank; torchrun's copies go to `log_dir`, or a temporary
    directory of torchrun's). Several nodes: static rendezvous at
    `rdzv_endpoint` (host:port of node 0) with this node's `node_rank`, so that node i runs global ranks
    i*nproc .. (i+1)*nproc - 1 as the plan's rank layout assumes."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes=1", "--tee=2"] + ([f"--log-dir={log_dir}"] if log_dir else [])
    else:
        host, port = parse_endpoint(rdzv_endpoint or "")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                f"--master-addr={host}", f"--master-port={port}"]
    return cmd + ["-m", TRAIN_MODULE, *train_args]


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


@dataclass
class Failure:
    """Why a launch failed: `kind` "input" (a rank refused its input: exit 2) or "crash" (exit 1)."""

    kind: str
    rank: int | None
    message: str


class Launch:
    """One local torchrun run, watched."""

    def __init__(self, cmd: list[str], job_dir: Path, console, env: dict | None = None):
        self.cmd = cmd
        self.job_dir = job_dir
        self.console = console
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.stderr_tail: deque[str] = deque(maxlen=400)
        self.rank_last: dict[int, str] = {}

    def _pump_stderr(self, stream, progress) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.stderr_tail.append(line)
            m = RANK_PREFIX.match(line)
            if m and m.group(2).strip():
                self.rank_last[int(m.group(1))] = m.group(2).strip()
            progress.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def run(self) -> int:
        """Run to completion; returns torchrun's exit status."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                            transient=False)
        task = None
        with progress:
            proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1, env=self.env, preexec_fn=child_dies_with_us(signal.SIGTERM))
            pump = threading.Thread(target=self._pump_stderr, args=(proc.stderr, progress), daemon=True)
            pump.start()
            try:
                for raw in proc.stdout:
                    line = raw.rstrip("\n")
                    if line.startswith(PROGRESS_PREFIX):
                        info = json.loads(line[len(PROGRESS_PREFIX):])
                        if task is None:
                            task = progress.add_task("train", total=info["steps"], info="starting",
                                                     completed=info["step"] - 1)
                        progress.update(task, completed=info["step"],
                                        info=f"loss {info['loss']:.4f}  {info['step_time_s'] * 1e3:,.0f} ms/step")
                    else:
                        progress.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
            pump.join(timeout=5)
        return rc

    def exit_codes(self) -> tuple[dict[int, int], int | None]:
        """({rank: exit code} of the failed ranks, the rank torchrun calls the root cause) from torchrun's
        failure summary; negative codes are signals."""
        codes, root, rank, in_root = {}, None, None, False
        for line in self.stderr_tail:
            in_root = in_root or SUMMARY_ROOT in line
            if m := SUMMARY_RANK.match(line):
                rank = int(m.group(1))
            elif (m := SUMMARY_EXIT.match(line)) and rank is not None:
                codes[rank] = int(m.group(1))
                if in_root and root is None:
                    root = rank
                rank = None
        return codes, root

    def failure(self) -> Failure:
        """The rank that failed first and why, from the ranks' error files and torchrun's summary, in this
        order: a user error (earliest first); a rank's own crash (earliest first); a rank killed by a signal
        that torchrun does not send (SIGKILL, SIGSEGV, ...: it could write nothing); a collective that failed
        because a peer went away; else torchrun's root cause with that rank's last stderr line."""
        records = []
        for f in sorted((self.job_dir / "errors").glob("rank*.json")):
            try:
                records.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        codes, root = self.exit_codes()
        for kind in ("input", "crash"):
            mine = [r for r in records if r.get("kind") == kind]
            if mine:
                first = min(mine, key=lambda r: r["time"])
                return Failure(kind, first["rank"], first["message"])
        written = {r["rank"] for r in records}
        killed = [r for r, code in codes.items() if code < 0 and -code != signal.SIGTERM and r not in written]
        if killed:
            rank = root if root in killed else min(killed)
            return Failure("crash", rank, f"killed by signal {-codes[rank]} ({_signal_name(-codes[rank])})")
        if records:
            first = min(records, key=lambda r: r["time"])
            return Failure("crash", first["rank"], first["message"])
        rank = root if root is not None else next(iter(codes), None)
        last = self.rank_last.get(rank) if rank is not None else None
        if last is None:
            last = next((x for x in reversed(self.stderr_tail) if x.strip()), "no output")
        detail = f" (exit code {codes[rank]})" if rank in codes else ""
        return Failure("crash", rank, f"{last}{detail}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
