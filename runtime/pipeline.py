"""One training step's forward and backward over a rank's model chunks: `torch.distributed.pipelining`
stages and schedules (GPipe, 1F1B, interleaved 1F1B with virtual stages) when pp > 1, plain gradient
accumulation over the micro-batches when pp = 1.

The loss of a step is the mean next-token cross entropy over every token of the global batch: each
micro-batch's loss is its token mean, gradients are averaged over the micro-batches (the schedules'
`scale_grads`, or loss / m without a pipeline) and over the data-parallel group (FSDP2 / replicate).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh

from planner.plan import Plan
from runtime.models import ModelChunk, lm_loss
from runtime.parallelize import set_gradient_sync


class StepRunner:
    """Runs forward and backward of one step on this rank and returns the sum of the micro-batch losses it
    computed (0 on ranks without the last stage)."""

    def __init__(self, plan: Plan, mesh: DeviceMesh, stages: list[int], chunks: list[ModelChunk],
                 device: torch.device, loss_fn: Callable = lm_loss,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        cfg = plan.config
        self.chunks = chunks
        self.loss_fn = loss_fn
        self.context = context
        self.nmb = cfg.num_microbatches
        self.num_stages = cfg.pp * cfg.vpp
        self.holds_first = 0 in stages
        self.holds_last = (self.num_stages - 1) in stages
        self.zero = cfg.zero
        self.schedule = None
        if cfg.pp > 1:
            from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                      ScheduleInterleaved1F1B)
            group = mesh["pp"].get_group()
            pstages = [PipelineStage(chunk, j, self.num_stages, device, group=group)
                       for j, chunk in zip(stages, chunks)]
            if cfg.schedule == "interleaved":
                self.schedule = ScheduleInterleaved1F1B(pstages, self.nmb, loss_fn=loss_fn)
            elif cfg.schedule == "gpipe":
                self.schedule = ScheduleGPipe(pstages[0], self.nmb, loss_fn=loss_fn)
            else:
                self.schedule = Schedule1F1B(pstages[0], self.nmb, loss_fn=loss_fn)
            _map_stages_to_processes(self.schedule, pstages, mesh["pp"], cfg.pp)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """inputs, targets: this data-parallel rank's sequences, [m * mbs, seq] int64 on the device."""
        with self.context():
            if self.schedule is not None:
                losses: list = []
                args = (inputs,) if self.holds_first else ()
                self.schedule.step(*args, target=targets if self.holds_last else None,
                                   losses=losses if self.holds_last else None, return_outputs=False)
                return float(sum(_scalar(x) for x in losses)) if self.holds_last else 0.0
            return self._accumulate(inputs, targets)

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """pp = 1: forward and backward of each micro-batch in turn. Gradients are reduced over the
        data-parallel group after every micro-batch with ZeRO 2-3 (sharded gradients) and after the last
        one only with ZeRO 0-1 (whole gradients accumulate locally, as DDP's no_sync)."""
        chunk = self.chunks[0]
        total = 0.0
        for i, (x, y) in enumerate(zip(inputs.chunk(self.nmb), targets.chunk(self.nmb))):
            last = i == self.nmb - 1
            set_gradient_sync(chunk, last or self.zero >= 2)
            loss = self.loss_fn(chunk(x), y)
            (loss / self.nmb).backward()
            total += _scalar(loss)
        return total


def _map_stages_to_processes(schedule, pstages: list, pp_mesh: DeviceMesh, pp: int) -> None:
    """Stage j runs on the process at pipeline coordinate j % pp of this rank's column of the mesh.
    torch.distributed.pipelining assumes stage j on pp-group rank j % pp, but the group numbers its members by
    global rank: a placement that puts a later stage on a lower process (node groups, measured links) needs
    the real mapping, set on the schedule and on every stage."""
    import torch.distributed as dist
    group = pp_mesh.get_group()
    processes = [int(r) for r in pp_mesh.mesh.tolist()]
    mapping = {j: dist.get_group_rank(group, processes[j % pp]) for j in range(pstages[0].num_stages)}
    if hasattr(schedule, "stage_index_to_group_rank"):
        schedule.stage_index_to_group_rank = mapping
    for stage in pstages:
        stage.stage_index_to_group_rank = mapping


def _scalar(loss) -> float:
    """A loss that may be a DTensor (loss parallel) as a Python float."""
    if hasattr(loss, "full_tensor"):
        loss = loss.full_tensor()
    return float(loss.detach())
