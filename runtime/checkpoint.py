"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP), written atomically and verified on resume.

Layout of a checkpoint directory D:
    D/step_00000042/          one complete checkpoint (DCP shards + .metadata, and meshplan.json)
    D/step_00000042.partial/  a checkpoint being written; renamed to step_00000042 only once every rank
                              has finished, so a run killed mid-save leaves the earlier ones intact.

Parameters and optimizer state are saved by their names in the whole model (`RankModel`), each rank
writing only its shards (the routed experts of an expert-parallel run by names that carry the experts an EP rank
holds, 'layers.3.mlp.experts[2:4].gate'); each rank's RNG state is saved under its own key so dropout continues exactly.
`meshplan.json` holds the step, the loss curve so far, a fingerprint of what must not change on resume
(model, batch, parallel config, seed, optimizer) and the size and SHA-256 of every file of the checkpoint;
it is plain JSON so `meshplan run --resume` can check it before starting any process. A checkpoint whose
files do not match (truncated, corrupted, missing) is refused with a line naming it, and the newest intact
one is used instead.

A save that fails on any rank (disk full, permission) removes what it wrote, leaves the earlier checkpoints
as they were and says which one is still the newest usable; training goes on.

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
from runtime.rank_layout import rank_grid

STEP_DIR = re.compile(r"^step_(\d{8})$")
SAVED_DIR = re.compile(r"^step_\d{8}(\.partial)?$")        # complete or being written
INFO_FILE = "meshplan.json"


CONFIG_KEYS = ("tp", "pp", "dp", "ep", "vpp", "mbs", "zero", "recompute", "sp", "schedule", "layers_per_stage",
               "num_microbatches")


def fingerprint(plan, seed: int, lr: float, data: str | None) -> str:
    """What a checkpoint must agree with to be resumed exactly: the model, the training setup, the parallel
    configuration and which process holds which coordinate, the seed, learning rate and data file (by its
    resolved path, as the ranks are given it; sha256 hex of their canonical JSON; other plan fields, such as
    predictions, do not matter)."""
    cfg = plan.config
    keep = {"model": plan.model.model_dump(mode="json"), "training": plan.training.model_dump(mode="json"),
            "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}, "grid": rank_grid(plan),
            "seed": seed, "lr": lr, "data": str(Path(data).resolve()) if data else None}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint under `root` as (step, path), or None (not checked for damage)."""
    found = complete(root)
    return found[0] if found else None


def complete(root: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint under `root` (a step directory with DCP metadata and meshplan.json), newest
    first."""
    p = Path(root)
    if not p.is_dir():
        return []
    out = []
    for child in p.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / INFO_FILE).is_file() and (child / ".metadata").is_file():
            out.append((int(m.group(1)), child))
    return sorted(out, reverse=True)


def clear(root: str | Path) -> None:
    """Delete every checkpoint under `root`, complete or partial; other files there are left alone."""
    p = Path(root)
    if p.is_dir():
        for child in p.iterdir():
            if SAVED_DIR.match(child.name) and child.is_dir():
                shutil.rmtree(child)


def read_info(path: Path) -> dict:
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint '{path}' has no readable {INFO_FILE} ({exc})", field="--resume") from None
    if not isinstance(info, dict):
        raise InputError(f"checkpoint '{path}' has no readable {INFO_FILE}", field="--resume")
    return info


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(path: Path, verify_contents: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None when intact): an unreadable meshplan.json, or a
    file missing or of another size (truncated) than when it was saved, or, with `verify_contents`, of
    other contents (SHA-256). Checkpoints written before meshplan recorded their files pass unchecked."""
    try:
        info = read_info(path)
    except InputError:
        return f"its {INFO_FILE} is unreadable"
    files = info.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"its {INFO_FILE} lists no files"
    for name, entry in sorted(files.items()):
        f = path / name
        try:
            size, digest = int(entry[0]), str(entry[1])
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size:,} bytes, {size:,} when saved (truncated)"
            if verify_contents and sha256(f) != digest:
                return f"{name} does not have the contents it was saved with (corrupted)"
        except (OSError, TypeError, ValueError, IndexError) as exc:
            return f"{name} cannot be checked ({exc})"
    return None


def check_checkpoint(path: Path, expected_fingerprint: str, steps: int,
                     verify_contents: bool = True) -> tuple[int, Path]:
    """(step, path) of a checkpoint `--resume` may continue from; InputError if it is damaged, was written
    for another plan / seed / learning rate / data, or is already at or past `steps`."""
    m = STEP_DIR.match(path.name)
    why = damage(path, verify_contents) if m else "not a checkpoint directory"
    if why:
        raise InputError(f"checkpoint '{path}' is damaged: {why}", field="--resume")
    if read_info(path).get("fingerprint") != expected_fingerprint:
        raise InputError(f"checkpoint '{path}' was written for a different plan, seed, learning rate or data "
                         f"file; it cannot be resumed exactly", field="--resume")
    step = int(m.group(1))
    if step >= steps:
        raise InputError(f"checkpoint '{path}' is at step {step}; --steps {steps} leaves nothing to run",
                         field="--steps")
    return step, path


def check_resumable(root: str | Path, expected_fingerprint: str, steps: int,
                    verify_contents: bool = True) -> tuple[tuple[int, Path], list[str]]:
    """The checkpoint `--resume` continues from, the newest intact one, and a line for each newer damaged
    one it passed over; InputError if there is none, or if the newest intact one was written for another
    plan / seed / learning rate / data, or is already at or past `steps`."""
    skipped = []
    for _, path in complete(root):
        why = damage(path, verify_contents)
        if why:
            skipped.append(f"checkpoint '{path}' is damaged ({why}); not used")
            continue
        return check_checkpoint(path, expected_fingerprint, steps, verify_contents=False), skipped
    if skipped:
        raise InputError(f"no intact checkpoint in '{root}' to resume from ({'; '.join(skipped)})", field="--resume")
    raise InputError(f"no complete checkpoint in '{root}' to resume from", field="--resume")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # flat optimizer keys ("state.layers.3.attn.q_proj.weight.exp_avg"), one entry per parameter, so that
    # every rank's entries survive DCP's merge of the ranks' plans
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _renamed(state: dict, names: dict[str, str]) -> dict:
    """`state` (a model or flattened optimizer state dict) with each parameter name in `names` replaced (as the
    whole key, or as the parameter part of 'state.NAME.exp_avg' / 'param_groups.NAME.lr')."""
    if not names:
        return state
    out = {}
    for key, value in state.items():
        for old, new in names.items():
            for prefix in ("", "state.", "param_groups."):
                head = prefix + old
                if key == head or key.startswith(head + "."):
                    key = prefix + new + key[len(head):]
                    break
        out[key] = value
    return out


def _state(model, optimizer, rank: int):
    """What a checkpoint holds for this rank: model and optimizer state (expert-parallel experts under names
    that say which experts they are, runtime.moe.checkpoint_names) and this rank's RNG state."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from runtime.moe import checkpoint_names
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    names = checkpoint_names(model)
    state = {"model": _renamed(model_sd, names), "optim": _renamed(optim_sd, names),
             f"rng_rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"cuda_rng_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer(path: Path, fail_with: int | None):
    """DCP's file-system writer (fsyncing each file); with `fail_with`, one whose writes fail with that errno
    (the disk-full testing hook), raised where a real write error would be."""
    from torch.distributed.checkpoint import FileSystemWriter
    if fail_with is None:
        return FileSystemWriter(str(path))

    class FailingWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            raise OSError(fail_with, os.strerror(fail_with), str(path))

    return FailingWriter(str(path))


def _describe(exc: BaseException) -> str:
    """One line for an exception, the failing rank's own one for DCP's CheckpointException."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, (inner, _) = next(iter(sorted(failures.items())))
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _first_error(error: str, rank: int) -> str:
    """Collective: the first rank's error (as 'rank R: ...'), or '' when no rank has one."""
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (rank, error))
    for r, e in everyone:
        if e:
            return e if e.startswith("rank ") else f"rank {r}: {e}"
    return ""


def save(root: str | Path, step: int, model, optimizer, info: dict, rank: int,
         fail_with: int | None = None) -> tuple[Path | None, str]:
    """Collective: every rank writes its shards into D/step_N.partial, the ranks hash the files between
    them, then rank 0 adds meshplan.json (with every file's size and SHA-256), fsyncs it and renames the
    directory to D/step_N. Returns (the final path, ""), or (None, why) when any rank failed: then the
    partial directory is removed, the earlier checkpoints are untouched, and `why` names the failing rank,
    its error and the newest checkpoint still usable. `fail_with`: an errno this rank's writes fail with."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".partial")
    error = ""
    if rank == 0:
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)                  # left by a run killed while saving
        except OSError as exc:
            error = _describe(exc)
    failed = _first_error(error, rank)
    if not failed:
        try:        # DCP gathers every rank's write errors and raises them on all ranks
            dcp.save(_state(model, optimizer, rank), storage_writer=_writer(tmp, fail_with))
        except (Exception, CheckpointException) as exc:
            error = _describe(exc)
        failed = _first_error(error, rank)
    if not failed:
        files, error = {}, ""
        try:
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            world = dist.get_world_size()
            files = {n: (tmp.joinpath(n).stat().st_size, sha256(tmp / n)) for n in names[rank::world]}
        except OSError as exc:
            error = _describe(exc)
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (error, files))
        error = next((e for e, _ in shares if e), "")
        if rank == 0 and not error:
            try:
                manifest = {n: entry for _, share in shares for n, entry in share.items()}
                with open(tmp / INFO_FILE, "w") as f:
                    f.write(json.dumps({**info, "files": manifest}, indent=1))
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(Path(root))
            except OSError as exc:
                error = _describe(exc)
        failed = _first_error(error, rank)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = latest(root)
        dist.barrier()
        still = f"'{newest[1]}' is still the newest usable checkpoint" if newest else "there is no checkpoint yet"
        return None, f"the checkpoint of step {step} was not saved ({failed}); {still}"
    return final, ""


def load(path: str | Path, model, optimizer, rank: int) -> dict:
    """Collective: restore parameters, optimizer state and this rank's RNG from a checkpoint written by
    `save` for the same plan. Returns its meshplan.json."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from runtime.moe import checkpoint_names
    state = _state(model, optimizer, rank)
    dcp.load(state, checkpoint_id=str(path))
    back = {new: old for old, new in checkpoint_names(model).items()}
    set_state_dict(model, optimizer, model_state_dict=_renamed(state["model"], back),
                   optim_state_dict=_renamed(state["optim"], back), options=_options())
    torch.set_rng_state(state[f"rng_rank{rank}"])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])
    return read_info(Path(path))
