"""One training step from each pipeline device's blocks, ends and data-parallel communication (seconds).

Shared by the homogeneous cost model (planner.cost.model, every device alike) and the node-group model
(planner.hetero.cost, each device priced on its own group): per-device forward and backward times per
micro-batch, the engine's DP communication exposed against the compute it overlaps (planner.cost.dp_comm),
the schedule's closed form (planner.cost.pipeline, Narayanan et al. SC21 Sec. 2.2), what each device does
after its last backward (the rest of the gradient reduction, the tied embedding's sync, the optimizer step),
and the step's breakdown on the critical device (it sums to the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from planner.cost.dp_comm import DPComm, exposed
from planner.cost.pipeline import pipeline_time
from planner.cost.schedule import link_delays

if TYPE_CHECKING:
    from planner.cost.model import BlockCost, EndsCost


class DeviceWork(NamedTuple):
    """What one pipeline device (all its chunks) does per step: seconds, and blocks (a tuple: the search
    builds one per device of every configuration it costs)."""

    layers: int              # blocks on the device
    block: "BlockCost"       # one block, one micro-batch, on this device's GPUs and links
    ends: "EndsCost"         # the embedding (charged on device 0) and head (on the last device)
    comm: DPComm             # its data-parallel communication (experts' included)
    tied_sync: float         # the tied embedding's gradient all-reduce after the last backward (0: none)
    optimizer: float         # its optimizer step


@dataclass(frozen=True)
class StepTimes:
    """The step and what it is made of (seconds)."""

    step: float
    crit: int                     # the critical device
    time: dict[str, float]        # breakdown on the critical device (TimeBreakdown's fields)
    pipeline: float               # the schedule's closed form
    pre_comm: float               # exposed parameter gathers before the first forward
    zero_fwd: list[float]         # exposed ZeRO communication per forward, per device
    zero_bwd: list[float]         # ... per backward
    post_comm: list[float]        # communication after the last backward, per device
    post_opt: list[float]         # optimizer step, per device


class DeviceTimes(NamedTuple):
    """One device's times as the step charges them (seconds)."""

    fwd: float          # one micro-batch's forward, exposed ZeRO gathers included
    bwd: float          # one micro-batch's backward (recomputation included), exposed ZeRO communication included
    zero_fwd: float     # of fwd, the exposed ZeRO communication
    zero_bwd: float     # of bwd, the exposed ZeRO communication
    first: float        # exposed parameter gathers of the step's first forward
    post: float         # communication after the last backward: the rest of the gradient reduction, tied sync


def device_times(d: DeviceWork, first: bool, last: bool, kappa: float, host_microbatch: float,
                 window: float = 1.0) -> DeviceTimes:
    """The times of device `d` (`first`: it holds the embedding, `last`: the head and loss); kappa, host_microbatch
    and window as in `step_times`."""
    fwd = d.layers * d.block.forward.total + host_microbatch
    bwd = d.layers * (d.block.backward.total + d.block.recompute.total)
    if first:
        fwd += d.ends.emb_fwd.total
        bwd += d.ends.emb_bwd.total
    if last:
        fwd += d.ends.head_fwd.total
        bwd += d.ends.head_bwd.total
    # data-parallel communication as the engine issues it, against the compute it overlaps
    c = d.comm
    zero_fwd = exposed(c.fwd_each, window * fwd, kappa, c.fwd_piece) + c.fwd_blocking
    zero_bwd = exposed(c.bwd_each, window * bwd, kappa, c.bwd_piece) + c.bwd_blocking
    once_first = exposed(c.first_fwd, window * (fwd + zero_fwd), kappa, c.fwd_piece)
    once_last = exposed(c.last_bwd, bwd + zero_bwd, kappa, 0.0 if c.bwd_each else c.bwd_piece)
    return DeviceTimes(fwd + zero_fwd, bwd + zero_bwd, zero_fwd, zero_bwd, once_first,
                       once_last + c.after + d.tied_sync)


def step_times(schedule: str, vpp: int, nmb: int, devices: list[DeviceWork], p2p: float | Sequence[float],
               kappa: float, host_microbatch: float, host_step: float, blocking: bool,
               window: float = 1.0) -> StepTimes:
    """The step of `devices` under `schedule` (vpp chunks per device) over nmb micro-batches; p2p: one activation
    transfer between neighbouring stages (one value, or one per link: pipeline.pipeline_time); kappa: the compute
    slowdown while communication overlaps it; host_*: the engine's host seconds per micro-batch and per step;
    blocking: transfers block the stages; window: the share of a pass the parameter gathers (and what shares their
    links) can run under (the engine's overlap.gather_window)."""
    pp, last = len(devices), len(devices) - 1
    # per-device, per-micro-batch times (embedding on the first device, head and loss on the last)
    times = [device_times(d, i == 0, i == last, kappa, host_microbatch, window) for i, d in enumerate(devices)]
    fwd, bwd = [t.fwd for t in times], [t.bwd for t in times]
    zero_fwd, zero_bwd = [t.zero_fwd for t in times], [t.zero_bwd for t in times]
    every = [f + b for f, b in zip(zero_fwd, zero_bwd)]

    pipe, crit = pipeline_time(schedule, nmb, fwd, bwd, p2p, vpp, blocking)

    # --- after each device's last backward (later stages finish theirs earlier, as the last micro-batch's
    # gradient flows back to stage 0): the rest of the gradient reduction, the tied-embedding sync, the
    # optimizer step
    ends_at, slack = [], 0.0
    per_hop = (1.0 / vpp) if schedule == "interleaved" else 1.0
    links = link_delays(p2p, pp)
    for i, d in enumerate(devices):
        ends_at.append((pipe - slack + times[i].post + d.optimizer, times[i].post, d.optimizer, i))
        slack += bwd[i] * per_hop + links[i]
    finish, post_comm, post_opt, _ = max(ends_at)
    first = max(t.first for t in times)
    step = finish + first + host_step
    # what the step spends after the pipeline: the finishing device's communication and optimizer, less the
    # part of it that ran while the pipeline drained
    after = finish - pipe
    if post_comm + post_opt > after > 0:
        post_comm, post_opt = (x * after / (post_comm + post_opt) for x in (post_comm, post_opt))

    # --- time breakdown on the critical path (sums to step)
    blk, ends, n = devices[crit].block, devices[crit].ends, devices[crit].layers
    recompute = n * blk.recompute.compute
    ep_comm = n * (blk.forward.ep + blk.backward.ep + blk.recompute.ep)
    tp_comm = n * (blk.forward.comm + blk.backward.comm + blk.recompute.comm) - ep_comm
    if crit == 0:
        tp_comm += ends.emb_fwd.comm + ends.emb_bwd.comm
    if crit == last:
        tp_comm += ends.head_fwd.comm + ends.head_bwd.comm
    compute = fwd[crit] + bwd[crit] - every[crit] - recompute - tp_comm - ep_comm - host_microbatch
    # what the transfers add to the pipeline (its time less the same schedule with instant transfers)
    transfers = pipe - pipeline_time(schedule, nmb, fwd, bwd, 0.0, vpp, blocking)[0] if pp > 1 else 0.0
    time = dict(compute=nmb * compute, recompute=nmb * recompute, tp_comm=nmb * tp_comm, ep_comm=nmb * ep_comm,
                pp_comm=transfers, dp_comm_exposed=nmb * every[crit] + first + post_comm, optimizer=post_opt,
                host=nmb * host_microbatch + host_step)
    time["bubble"] = max(0.0, step - sum(time.values()))
    order = sorted(ends_at, key=lambda e: e[3])
    return StepTimes(step, crit, time, pipe, first, zero_fwd, zero_bwd, [e[1] for e in order],
                     [e[2] for e in order])
