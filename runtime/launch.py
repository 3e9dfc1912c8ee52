"""Start the ranks with torchrun (`python -m torch.distributed.run`, the interpreter running meshplan) and
follow them: a progress bar from rank 0's progress lines, the ranks' stderr passed through with their rank
prefixed, and on failure the rank that failed first and its last error line.

No torch import here: the parent process only launches and watches.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from runtime.train import PROGRESS_PREFIX

TRAIN_MODULE = "runtime.train"
RANK_PREFIX = re.compile(r"^\[[^\]]*?(\d+)\]:(.*)$")          # torchrun --tee: "[default3]:text"
SUMMARY_RANK = re.compile(r"rank\s*:\s*(\d+)")
SUMMARY_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


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
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def run(self) -> int:
        """Run to completion; returns torchrun's exit status."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                            transient=False)
        task = None
        with progress:
            proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1, env=self.env)
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
                        progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
            pump.join(timeout=5)
        return rc

    def failure(self) -> Failure:
        """The first failure: the ranks' error files (earliest first; a user error beats a crash), else
        torchrun's summary of the failed rank and that rank's last stderr line."""
        records = []
        for f in sorted((self.job_dir / "errors").glob("rank*.json")):
            try:
                records.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        inputs = [r for r in records if r.get("kind") == "input"]
        if inputs:
            first = min(inputs, key=lambda r: r["time"])
            return Failure("input", first["rank"], first["message"])
        if records:
            first = min(records, key=lambda r: r["time"])
            return Failure("crash", first["rank"], first["message"])
        rank = None
        for line in self.stderr_tail:
            m = SUMMARY_RANK.search(line)
            if m and "local_rank" in line:
                rank = int(m.group(1))
                break
        exitcode = next((SUMMARY_EXIT.search(x).group(1) for x in self.stderr_tail if SUMMARY_EXIT.search(x)), None)
        last = self.rank_last.get(rank) if rank is not None else None
        if last is None:
            last = next((x for x in reversed(self.stderr_tail) if x.strip()), "no output")
        detail = f" (exit code {exitcode})" if exitcode is not None else ""
        return Failure("crash", rank, f"{last}{detail}")
