"""`meshplan run`: train with a plan through torchrun and compare measured against predicted.

Imports nothing heavy at module level (planner/cli.py registers `run_command` for every meshplan command,
and `meshplan estimate` must stay fast); torch itself is imported only by the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from runtime.train import DEFAULT_LR, DEFAULT_SEED, DEFAULT_STEPS, parse_args


def run_command(
    plan: Path = typer.Argument(..., help="Plan file from `meshplan estimate -o` or `meshplan plan -o`."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Optimizer steps (with --resume: the step to reach; "
                                                             "1-10,000,000)."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the initial weights, the data and dropout "
                                                          "(0-4,294,967,295)."),
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="Learning rate (constant; 0-10)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Flat binary file of token ids (nanoGPT / "
                                                            "Megatron .bin); default: synthetic tokens."),
    data_dtype: str = typer.Option("uint16", "--data-dtype", help="Token id type of --data: uint16 | uint32."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where checkpoints go."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Save every K steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in "
                                                        "--checkpoint-dir (damaged ones are named and skipped)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the run report (JSON) here."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also draw the plan and the run as a self-contained "
                                                             "HTML page (as `meshplan report` does)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --report / --html if they exist; without --resume, "
                                                      "delete the checkpoints of an earlier run in --checkpoint-dir."),
    print_command: bool = typer.Option(False, "--print-command",
                                       help="Print each node's torchrun command instead of running."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", help="Nodes (default: the plan's)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank",
                                            help="With --print-command: print only this node's command."),
    rdzv_endpoint: str = typer.Option("NODE0_HOST:29500", "--rdzv-endpoint",
                                      help="host:port of node 0 for a multi-node rendezvous."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node",
                                                 help="Processes per node (default: the plan's GPUs per node)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile each transformer block (default: as the plan's engine "
                                                "was costed, `estimate/plan --compile`)."),
):
    """Train with a plan through torchrun, show progress, and compare measured against predicted.

    Example: meshplan run plan.json --steps 20 --report run.json
    """
    from rich.console import Console
    from rich.markup import escape

    from planner.errors import InputError
    from planner.limits import check_option
    from planner.outputs import check_new_output
    from planner.plan import load_plan
    from runtime import checkpoint as ckpt
    from runtime.checks import check_run
    from runtime.launch import Launch, format_command, parse_endpoint, torchrun_command

    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    for value, field in ((steps, "--steps"), (seed, "--seed"), (lr, "--lr"), (checkpoint_every, "--checkpoint-every"),
                         (nnodes, "--nnodes"), (node_rank, "--node-rank"), (nproc_per_node, "--nproc-per-node")):
        check_option(value, field)
    p = load_plan(plan)
    nodes = nnodes if nnodes is not None else p.cluster.num_nodes
    per_node = nproc_per_node if nproc_per_node is not None else p.cluster.gpus_per_node
    parse_endpoint(rdzv_endpoint)
    if data_dtype not in ("uint16", "uint32"):
        raise InputError(f"'{data_dtype}' is not one of uint16, uint32", field="--data-dtype")
    train_args = ["--plan", os.path.abspath(plan), "--steps", str(steps), "--seed", str(seed), "--lr", repr(lr)]
    if compile if compile is not None else p.engine.compile:
        train_args.append("--compile")
    if data:
        train_args += ["--data", os.path.abspath(data), "--data-dtype", data_dtype]
    if checkpoint_dir:
        train_args += ["--checkpoint-dir", os.path.abspath(checkpoint_dir)]
    if checkpoint_every:
        train_args += ["--checkpoint-every", str(checkpoint_every)]
    if resume:
        train_args.append("--resume")
    if force:
        train_args.append("--force")
    args = parse_args(train_args)          # what every rank will read
    check_run(p, nodes * per_node, args)
    if not p.feasible:
        err.print(f"[yellow]warning:[/] the plan is predicted not to fit: {escape(p.reason)}")
    if resume:
        (_, resume_path), skipped = ckpt.check_resumable(args.checkpoint_dir, ckpt.fingerprint(p, seed, lr, args.data),
                                                         steps)
        for line in skipped:
            err.print(f"[yellow]warning:[/] {escape(line)}; resuming from '{escape(str(resume_path))}'",
                      soft_wrap=True)
        train_args += ["--resume-from", str(resume_path)]
    if report is not None:
        check_new_output(report, force, "--report")
    if html is not None:
        from planner.html_report.command import check_output
        if print_command:
            raise InputError("the ranks of a multi-node run write only the run report; draw it afterwards with "
                             "`meshplan report RUN_REPORT -o report.html`", field="--html")
        check_output(html, force, "--html")

    if print_command:
        if node_rank is not None and not 0 <= node_rank < nodes:
            raise InputError(f"must be in 0..{nodes - 1} (got {node_rank})", field="--node-rank")
        if report is not None:
            train_args += ["--report", str(report.resolve())]
        ranks = [node_rank] if node_rank is not None else list(range(nodes))
        for r in ranks:
            cmd = torchrun_command(train_args, per_node, nodes, r, rdzv_endpoint)
            if nodes > 1:
                print(f"# node {r} of {nodes}")
            print(format_command(cmd))
        return
    if nodes > 1:
        raise InputError(f"the plan spans {nodes} nodes; run `meshplan run {plan} --print-command` and start "
                         f"each node's command there", field="--nnodes")

    job_dir = Path(tempfile.mkdtemp(prefix="meshplan-run-"))
    try:
        report_path = report.resolve() if report is not None else job_dir / "report.json"
        train_args += ["--report", str(report_path), "--job-dir", str(job_dir), "--progress-protocol"]
        cmd = torchrun_command(train_args, per_node, log_dir=str(job_dir / "logs"))
        err.print(f"launching {per_node} processes: {format_command(cmd)}", soft_wrap=True, markup=False)
        launch = Launch(cmd, job_dir, err)
        rc = launch.run()
        if rc != 0:
            failure = launch.failure()
            if failure.kind == "input":
                raise InputError(failure.message)
            who = f"rank {failure.rank}" if failure.rank is not None else "a rank"
            err.print(f"[red]error:[/] {who} failed: {escape(failure.message)}", soft_wrap=True)
            raise typer.Exit(1)
        if not report_path.is_file():
            err.print("[red]error:[/] the ranks finished but rank 0 wrote no report")
            raise typer.Exit(1)
        from runtime.report import render_report
        written = json.loads(report_path.read_text())
        render_report(out, written)
        if report is not None:
            out.print(f"run report written to {report}")
        if html is not None:
            from planner.cli import write_new_file
            from planner.html_report import build_html
            from planner.html_report.inputs import RunReport
            write_new_file(html, build_html(p, RunReport.model_validate(written)), force, "--html")
            out.print(f"report written to {html}", soft_wrap=True)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)

