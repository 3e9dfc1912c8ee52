"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP), written atomically.

Layout of a checkpoint directory D:
    D/step_00000042/          one complete checkpoint (DCP shards + .metadata, and meshplan.json)
    D/step_00000042.partial/  a checkpoint being written; renamed to step_00000042 only once every rank
                              has finished, so a run killed mid-save leaves the earlier ones intact.

Parameters and optimizer state are saved by their names in the whole model (`RankModel`), each rank
writing only its shards; each rank's RNG state is saved under its own key so dropout continues exactly.
`meshplan.json` holds the step, the loss curve so far and a fingerprint of what must not change on
resume (model, batch, parallel config, seed, optimizer); it is plain JSON so `meshplan run --resume`
can check it before starting any process.

A new run (no --resume) that would save into a directory holding complete checkpoints is refused
(runtime.checks), unless --force, which deletes the step directories (and nothing else there) first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from planner.errors import InputError

STEP_DIR = re.compile(r"^step_(\d{8})$")
SAVED_DIR = re.compile(r"^step_\d{8}(\.partial)?$")        # complete or being written
INFO_FILE = "meshplan.json"


CONFIG_KEYS = ("tp", "pp", "dp", "vpp", "mbs", "zero", "recompute", "sp", "schedule", "layers_per_stage",
               "num_microbatches")


def fingerprint(plan, seed: int, lr: float, data: str | None) -> str:
    """What a checkpoint must agree with to be resumed exactly: the model, the training setup, the parallel
    configuration and which process holds which coordinate, the seed, learning rate and data file (by its
    resolved path, as the ranks are given it; sha256 hex of their canonical JSON; other plan fields, such as
    predictions, do not matter)."""
    from runtime.checks import rank_grid
    cfg = plan.config
    keep = {"model": plan.model.model_dump(mode="json"), "training": plan.training.model_dump(mode="json"),
            "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}, "grid": rank_grid(plan),
            "seed": seed, "lr": lr, "data": str(Path(data).resolve()) if data else None}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint under `root` as (step, path), or None."""
    best = None
    p = Path(root)
    if not p.is_dir():
        return None
    for child in p.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / INFO_FILE).is_file() and (child / ".metadata").is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best


def clear(root: str | Path) -> None:
    """Delete every checkpoint under `root`, complete or partial; other files there are left alone."""
    p = Path(root)
    if p.is_dir():
        for child in p.iterdir():
            if SAVED_DIR.match(child.name) and child.is_dir():
                shutil.rmtree(child)


def read_info(path: Path) -> dict:
    try:
        return json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint '{path}' has no readable {INFO_FILE} ({exc})", field="--resume") from None


def check_resumable(root: str | Path, expected_fingerprint: str, steps: int) -> tuple[int, Path]:
    """The checkpoint `--resume` continues from; InputError if there is none, if it was written for
    another plan / seed / learning rate / data, or if it is already at or past `steps`."""
    found = latest(root)
    if found is None:
        raise InputError(f"no complete checkpoint in '{root}' to resume from", field="--resume")
    step, path = found
    info = read_info(path)
    if info.get("fingerprint") != expected_fingerprint:
        raise InputError(f"checkpoint '{path}' was written for a different plan, seed, learning rate or data "
                         f"file; it cannot be resumed exactly", field="--resume")
    if step >= steps:
        raise InputError(f"checkpoint '{path}' is at step {step}; --steps {steps} leaves nothing to run",
                         field="--steps")
    return step, path


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # flat optimizer keys ("state.layers.3.attn.q_proj.weight.exp_avg"), one entry per parameter, so that
    # every rank's entries survive DCP's merge of the ranks' plans
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model, optimizer, rank: int):
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd, f"rng_rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"cuda_rng_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def save(root: str | Path, step: int, model, optimizer, info: dict, rank: int) -> Path:
    """Collective: every rank writes its shards into D/step_N.partial, then rank 0 adds meshplan.json and
    renames the directory to D/step_N. Returns the final path."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".partial")
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)                  # left by a run killed while saving
    dist.barrier()
    dcp.save(_state(model, optimizer, rank), checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load(path: str | Path, model, optimizer, rank: int) -> dict:
    """Collective: restore parameters, optimizer state and this rank's RNG from a checkpoint written by
    `save` for the same plan. Returns its meshplan.json."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer, rank)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    torch.set_rng_state(state[f"rng_rank{rank}"])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])
    return read_info(Path(path))
