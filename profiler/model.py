"""`meshplan profile model`: measure every (TP shard size, micro-batch size, recompute mode) of a model's
block (of each kind: dense, and mixture of experts with every expert on the device), its embedding and LM
head per (TP, micro-batch), and the optimizer step, into a ModelProfile.

The run prints an estimate first (probes of the cheapest and the dearest block, scaled by each
measurement's work and repetitions), shows a progress bar, writes `<output>.partial.json` after every
measurement (a rerun with the same model, precision, sequence and device resumes from it), gives the
estimate's probes and each measurement a deadline (`timeout_s`: past it the run stops with a message
naming the measurement, the partial file kept; an exception stops it the same way), and writes the output
when every measurement is done. A measurement skipped for lack of device memory leaves the output marked
incomplete (`complete: false`, what was measured kept); a rerun resumes it and measures the rest.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from planner.profile_data import (BlockMeasurement, DeviceInfo, EndMeasurement, ModelProfile,
                                  PROFILE_SCHEMA_VERSION)
from planner.specs import ModelSpec
from profiler.errors import ProfileFailed
from profiler.io import atomic_write, partial_path


@dataclass(frozen=True)
class Task:
    """One measurement: a block of one kind ('dense' / 'moe' MLP) at (tp, mbs, recompute), an end ('embedding' /
    'head') at (tp, mbs), or the optimizer."""

    kind: str            # "block" | "embedding" | "head" | "optimizer"
    tp: int = 1
    mbs: int = 1
    recompute: str = "none"
    layer: str = "dense"  # a block's MLP: "dense" | "moe"

    @property
    def label(self) -> str:
        if self.kind == "optimizer":
            return "optimizer step"
        if self.kind == "block":
            name = "moe block" if self.layer == "moe" else "block"
            return f"{name} tp{self.tp} mbs{self.mbs} {self.recompute}"
        return f"{self.kind} tp{self.tp} mbs{self.mbs}"


def block_layers(spec: ModelSpec) -> dict[str, int]:
    """{kind of block: the first layer of that kind} for the kinds the model has ('dense', 'moe')."""
    out: dict[str, int] = {}
    for i in range(spec.num_layers):
        out.setdefault("moe" if spec.moe is not None and spec.moe.is_moe_layer(i) else "dense", i)
    return out


def make_tasks(tps: list[int], mbss: list[int], recomputes: list[str], layers: list[str] = ("dense",)) -> list[Task]:
    tasks = [Task("block", t, b, r, k) for k in layers for t in tps for b in mbss for r in recomputes]
    tasks += [Task(part, t, b) for part in ("embedding", "head") for t in tps for b in mbss]
    return tasks + [Task("optimizer")]


def _done_keys(profile: ModelProfile) -> set[Task]:
    done = {Task("block", b.tp, b.mbs, b.recompute, b.layer) for b in profile.blocks}
    done |= {Task(e.part, e.tp, e.mbs) for e in profile.ends}
    if profile.optimizer_s_per_param is not None:
        done.add(Task("optimizer"))
    return done


def is_incomplete_profile(path: Path) -> bool:
    """Whether `path` is a model profile marked incomplete (measurements skipped for lack of device memory),
    which a rerun resumes and completes in place."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == "model_profile" and data.get("complete") is False


def _load_partial(path: Path, fresh: ModelProfile) -> ModelProfile | None:
    """The partial profile at `path` when it was measured for the same model, precision, sequence and
    device; None when there is none. Anything else is an InputError (rerun with --force to start over)."""
    if not path.exists():
        return None
    try:
        old = ModelProfile.model_validate(json.loads(path.read_text()))
    except Exception:   # noqa: BLE001 - any unreadable partial file gets the same advice
        raise InputError(f"cannot read the partial results '{path}'; delete it or pass --force",
                         field="--output") from None
    for field in ("model", "precision", "seq_len", "run_precision", "optimizer"):
        if getattr(old, field) != getattr(fresh, field):
            raise InputError(f"partial results '{path}' are for another {field.replace('_', ' ')}; rerun with "
                             f"the same options to resume, or pass --force to start over", field="--output")
    if (old.device.type, old.device.name) != (fresh.device.type, fresh.device.name):
        raise InputError(f"partial results '{path}' were measured on {old.device.name}; pass --force to start "
                         f"over here", field="--output")
    return old


def _flops(spec: ModelSpec, task: Task, seq: int) -> float:
    """Forward + backward FLOPs of a task by the cost model's kernel lists (for the time estimate)."""
    from planner.cost.kernels import Dtypes, block_work, embedding_work, head_work
    dt = Dtypes.of("fp32")
    if task.kind == "block":
        w = block_work(spec, task.mbs, seq, task.tp, False, task.recompute, dt, moe_layer=task.layer == "moe")
        passes = [w.forward, w.backward, w.recompute]
    elif task.kind == "embedding":
        passes = list(embedding_work(spec, task.mbs, seq, task.tp, False, dt))
    elif task.kind == "head":
        passes = list(head_work(spec, task.mbs, seq, task.tp, False, dt))
    else:
        return 0.0
    return sum(k.flops + k.bytes for p in passes for k in p.kernels)


class _Deadline:
    """Ends the process (exit 4) with a message naming the measurement if it runs past `timeout_s`."""

    def __init__(self, timeout_s: float, label: str, partial: Path):
        self.timer = threading.Timer(timeout_s, self._expire, args=(timeout_s, label, partial))
        self.timer.daemon = True

    @staticmethod
    def _expire(timeout_s: float, label: str, partial: Path) -> None:
        print(f"error: measurement '{label}' took more than {timeout_s:.0f} s (--timeout){_kept(partial)}",
              file=sys.stderr, flush=True)
        os._exit(ProfileFailed.exit_code)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


def _kept(partial: Path) -> str:
    """Where the results so far are, for an error message (nothing when there are none yet)."""
    return f"; results so far are in {partial}, rerun the same command to resume" if partial.exists() else ""


@contextmanager
def _measuring(label: str, timeout_s: float, partial: Path):
    """One measurement: past `timeout_s` the process ends (exit 4); an exception becomes ProfileFailed, one
    line naming the measurement."""
    with _Deadline(timeout_s, label, partial):
        try:
            yield
        except ProfileFailed:
            raise
        except Exception as exc:   # noqa: BLE001 - one line naming the measurement, then stop
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ProfileFailed(f"measurement '{label}' failed: {type(exc).__name__}: {first}{_kept(partial)}"
                                ) from exc


ESTIMATE_LABEL = "time estimate (probe blocks)"


def _estimate(spec: ModelSpec, seq: int, tps: list[int], mbss: list[int], todo: list[Task], precision: str,
              device, warmup: int, reps: int) -> float:
    """Seconds the remaining measurements should take: the cheapest and the dearest block are probed (one
    warm-up, one timed pass, after a throw-away build that pays one-off costs), a pass is taken as
    a + b * work (work = FLOPs + bytes of the cost model's kernels) through the two probes, and each
    measurement costs its build plus (warmup + reps + 1) passes."""
    from profiler import layers
    kind, layer_id = next(iter(block_layers(spec).items()))      # probes of layer 0's kind
    blocks = [Task("block", t, b, "none", kind) for t in tps for b in mbss]
    lo = min(blocks, key=lambda t: _flops(spec, t, seq))
    hi = max(blocks, key=lambda t: _flops(spec, t, seq))
    probes = []
    import torch
    for task in (lo, lo, hi):
        t0 = time.perf_counter()
        try:
            r = layers.measure_block(spec, task.tp, task.mbs, seq, "none", precision, device, warmup=1, reps=1,
                                     layer_id=layer_id)
        except torch.OutOfMemoryError:   # the dearest block may not fit: scale from the cheapest alone
            if not probes:
                raise ProfileFailed(f"the smallest block ({task.label}) does not fit in device memory") from None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            probes.append(probes[-1])
            continue
        wall = time.perf_counter() - t0
        probes.append((_flops(spec, task, seq), r.forward_s + r.backward_s, wall))
    (w_lo, p_lo, wall_lo), (w_hi, p_hi, _) = probes[1], probes[2]
    b = max(0.0, (p_hi - p_lo) / (w_hi - w_lo)) if w_hi > w_lo else p_lo / max(w_lo, 1.0)
    a = max(0.0, p_lo - b * w_lo)
    setup = max(0.0, wall_lo - 3 * p_lo)
    return sum(setup + (warmup + reps + 1) * (a + b * _flops(spec, t, seq)) for t in todo if t.kind != "optimizer")


def profile_model(spec: ModelSpec, precision: str, seq: int, tps: list[int], mbss: list[int],
                  recomputes: list[str], output: Path, optimizer: str = "adamw", force: bool = False,
                  warmup: int = 2, reps: int = 5, timeout_s: float = 600.0, threads: int | None = None,
                  console=None, progress: bool = True) -> ModelProfile:
    """Measure and write the model profile; returns it. Inputs are assumed validated (see profiler.cli)."""
    import torch

    from planner.engine import run_precision

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    run_prec = run_precision(precision, device.type)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    fresh = ModelProfile(schema_version=PROFILE_SCHEMA_VERSION, model=spec, precision=precision,
                         run_precision=run_prec if run_prec != precision else None, seq_len=seq,
                         device=DeviceInfo(type=device.type, name=name, torch_version=torch.__version__,
                                           threads=torch.get_num_threads() if device.type == "cpu" else None),
                         blocks=[], ends=[], optimizer=optimizer, complete=False)
    part = partial_path(output)
    # resume the partial file of an interrupted run, else an output marked incomplete (skipped measurements)
    source = part if part.exists() or not is_incomplete_profile(output) else output
    prof = None if force else _load_partial(source, fresh)
    resumed = prof is not None
    prof = prof or fresh
    tasks = make_tasks(tps, mbss, recomputes, list(block_layers(spec)))
    todo = [t for t in tasks if t not in _done_keys(prof)]

    say = console.print if console is not None else print
    if run_prec != precision:
        say(f"note: the runtime computes in {run_prec} on {device.type}; profiling {run_prec} "
            f"(the file says precision {precision}, run_precision {run_prec})")
    with _measuring(ESTIMATE_LABEL, timeout_s, part):
        est = _estimate(spec, seq, tps, mbss, todo, run_prec, device, warmup, reps)
    what = f"resuming {source.name}: " if resumed else ""
    about = f"{est:.0f}" if est >= 10 else f"{est:.1f}"
    say(f"{what}profiling {spec.name} ({precision}, seq {seq}) on {name}: {len(todo)} of {len(tasks)} "
        f"measurements, about {about} s")
    started = time.perf_counter()

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        bar = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, transient=True)
        bar_task = bar.add_task("starting", total=len(tasks), completed=len(tasks) - len(todo))
        bar.start()
    skipped = []
    try:
        for task in todo:
            if bar is not None:
                bar.update(bar_task, description=task.label)
            with _measuring(task.label, timeout_s, part):
                try:
                    _run_task(prof, task, spec, seq, run_prec, optimizer, device, warmup, reps)
                except torch.cuda.OutOfMemoryError:
                    skipped.append(task.label)
                    torch.cuda.empty_cache()
            atomic_write(part, prof.model_dump_json(indent=1))
            if bar is not None:
                bar.advance(bar_task)
    finally:
        if bar is not None:
            bar.stop()
    say(f"measured in {time.perf_counter() - started:.1f} s")
    prof.complete = not skipped
    ModelProfile.model_validate(prof.model_dump())
    atomic_write(output, prof.model_dump_json(indent=1) + "\n")
    part.unlink(missing_ok=True)
    if skipped:
        say(f"skipped (out of device memory): {', '.join(skipped)}; {output} is marked incomplete, rerun the "
            f"same command to measure them")
    return prof


def _run_task(prof: ModelProfile, task: Task, spec: ModelSpec, seq: int, precision: str, optimizer: str,
              device, warmup: int, reps: int) -> None:
    from profiler import layers
    if task.kind == "block":
        r = layers.measure_block(spec, task.tp, task.mbs, seq, task.recompute, precision, device, warmup, reps,
                                 layer_id=block_layers(spec)[task.layer])
        prof.blocks.append(BlockMeasurement(layer=task.layer, tp=task.tp, mbs=task.mbs, recompute=task.recompute,
                                            forward_s=r.forward_s, backward_s=r.backward_s,
                                            activation_bytes=r.activation_bytes,
                                            allocator_activation_bytes=r.allocator_activation_bytes))
    elif task.kind in ("embedding", "head"):
        fn = layers.measure_embedding if task.kind == "embedding" else layers.measure_head
        r = fn(spec, task.tp, task.mbs, seq, precision, device, warmup, reps)
        prof.ends.append(EndMeasurement(part=task.kind, tp=task.tp, mbs=task.mbs, forward_s=r.forward_s,
                                        backward_s=r.backward_s, activation_bytes=r.activation_bytes))
    else:
        prof.optimizer_s_per_param = layers.measure_optimizer(spec, optimizer, device, warmup, reps)


def _cpu_name() -> str:
    from profiler.devices import cpu_model_name
    return f"{cpu_model_name()} ({os.cpu_count()} cores)"
