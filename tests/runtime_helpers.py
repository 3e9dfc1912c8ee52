"""Shared pieces of the runtime tests: plans for any layout, many layouts in one torchrun launch, and (from
tests/reference_model.py) the plain PyTorch single-process run that every layout must reproduce."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from planner.cost.model import CostModel
from planner.loaders import load_cluster
from planner.plan import Plan, make_plan
from planner.presets import PRESETS
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def model_spec(model: str | ModelSpec = "gpt-tiny", update: dict | None = None) -> ModelSpec:
    """A preset (or a spec), with some fields changed."""
    spec = PRESETS[model] if isinstance(model, str) else model
    return ModelSpec(**{**spec.model_dump(), **(update or {})})


def make_test_plan(model: str | ModelSpec = "gpt-tiny", global_batch: int = 8, seq: int = 32,
                   precision: str = "fp32", optimizer: str = "adamw", **config) -> Plan:
    """A plan for cpu-local resized to tp*pp*dp processes on one node."""
    spec = model_spec(model)
    cfg = ParallelConfig(**config)
    cluster = load_cluster("cpu-local", nodes=1, gpus_per_node=cfg.num_gpus)
    training = TrainingSpec(global_batch=global_batch, seq_len=seq, precision=precision, optimizer=optimizer)
    return make_plan(spec, cluster, training, CostModel(spec, cluster, training).evaluate(cfg))


def reference_losses(spec: ModelSpec, global_batch: int, seq: int, steps: int, **kwargs) -> list[float]:
    """The loss curve of the plain PyTorch single-process run (tests/reference_model.py; imports torch)."""
    from tests.reference_model import reference_losses as run
    return run(spec, global_batch, seq, steps, **kwargs)


def relative_error(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Many layouts in one torchrun launch: `torchrun --nproc-per-node N tests/runtime_helpers.py IN OUT`
# ----------------------------------------------------------------------------------------------
def run_layouts(layouts: list[dict], nproc: int, tmp: Path, timeout: float = 600) -> dict[str, dict]:
    """Train each layout for its steps on `nproc` processes, all in one launch; returns
    {name: {'losses': [...], 'seconds': s}} from rank 0. A layout: {'name', 'config': {tp, pp, ...}} and
    optionally 'model' (preset), 'model_update' (fields to change), 'global_batch', 'seq', 'steps',
    'optimizer', 'lr', 'checkpoint_every' (checkpoints go to tmp/<name>), and 'resume': [name, step] to
    build the layout afresh and continue from that layout's checkpoint at that step."""
    import json
    spec_file, out_file = tmp / "layouts.json", tmp / "losses.json"
    spec_file.write_text(json.dumps(layouts))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={tmp / 'torchrun-logs'}", str(Path(__file__).resolve()), str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"layouts launch failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def _layouts_worker(spec_file: str, out_file: str) -> None:
    import argparse
    import json
    import time

    import torch
    import torch.distributed as dist

    from runtime.train import DEFAULT_LR, run_plan

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    try:
        for lay in json.loads(Path(spec_file).read_text()):
            t0 = time.perf_counter()
            spec = model_spec(lay.get("model", "gpt-tiny"), lay.get("model_update"))
            plan = make_test_plan(spec, lay.get("global_batch", 8), lay.get("seq", 32),
                                  optimizer=lay.get("optimizer", "adamw"), **lay["config"])
            every = lay.get("checkpoint_every", 0)
            args = argparse.Namespace(steps=lay.get("steps", 4), seed=lay.get("seed", 0), lr=lay.get("lr", DEFAULT_LR),
                                      data=None, data_dtype="uint16", checkpoint_every=every, plan=None,
                                      checkpoint_dir=str(Path(out_file).parent / lay["name"]) if every else None)
            resume_from = None
            if "resume" in lay:
                source, step = lay["resume"]
                resume_from = (step, Path(out_file).parent / source / f"step_{step:08d}")
            losses, _, _ = run_plan(plan, args, rank, torch.device("cpu"), resume_from)
            dist.barrier()
            results[lay["name"]] = {"losses": losses, "seconds": time.perf_counter() - t0}
            if rank == 0:
                print(f"{lay['name']}: {losses} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _layouts_worker(sys.argv[1], sys.argv[2])
