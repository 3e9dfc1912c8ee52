"""What one micro-batch keeps each pipeline device busy with, as the cost model charged it (Core.work).

The cost model sums these into one forward and one backward time per device for the closed forms of
planner/cost/pipeline.py; here they stay split by chunk and by kind (forward, backward, recompute,
communication) for the schedule simulation (planner/cost/schedule.py) behind `meshplan report`'s timeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.cost.model import BlockCost, EndsCost
    from planner.cost.schedule import Piece


@dataclass(frozen=True)
class StageWork:
    """Seconds per micro-batch and per device, one TP rank; chunk c of device i is virtual stage c * pp + i."""

    chunk_layers: list[list[int]]   # blocks of each local chunk, per device
    blocks: list[BlockCost]         # one (mean) block of each device's layers, one micro-batch
    ends: EndsCost                  # embedding (virtual stage 0), LM head and loss (the last virtual stage)
    zero_fwd: list[float]           # exposed ZeRO-3 gathers of one micro-batch's forward, per device
    zero_bwd: list[float]           # exposed ZeRO-2/3 gathers and reduce-scatters of one backward, per device
    hops: tuple[float, ...]         # one activation or gradient on each hop, h: device h to h + 1 (none with pp 1)
    post_comm: list[float]          # DP / tied-embedding communication after the last backward, per device
    post_opt: list[float]           # optimizer step, per device
    pipeline_s: float               # the closed form's pipeline time (planner/cost/pipeline.py)
    pre_comm: float = 0.0           # exposed parameter gathers before the step's first forward
    host_step: float = 0.0          # the engine's host time per step
    blocking_p2p: bool = False      # transfers keep both stages busy (else a link delay only)
    host_microbatch: float = 0.0    # the engine's host time per micro-batch, in each forward

    @property
    def pp(self) -> int:
        return len(self.chunk_layers)

    @property
    def vpp(self) -> int:
        return len(self.chunk_layers[0])

    def _share(self, device: int, chunk: int) -> float:
        """The chunk's share of the device's blocks (per-block ZeRO collectives split by it)."""
        layers = self.chunk_layers[device]
        return layers[chunk] / sum(layers) if sum(layers) else 1.0 / len(layers)

    def _ends_of(self, device: int, chunk: int) -> list:
        """(forward, backward) PassCosts of the embedding / head this chunk holds."""
        out = []
        if device == 0 and chunk == 0:
            out.append((self.ends.emb_fwd, self.ends.emb_bwd))
        if device == self.pp - 1 and chunk == self.vpp - 1:
            out.append((self.ends.head_fwd, self.ends.head_bwd))
        return out

    def forward(self, device: int, chunk: int) -> list[Piece]:
        """One micro-batch's forward of a chunk: kernels, then TP collectives and exposed ZeRO gathers."""
        n, blk = self.chunk_layers[device][chunk], self.blocks[device]
        compute, comm = n * blk.forward.compute, n * blk.forward.comm
        for fwd, _ in self._ends_of(device, chunk):
            compute, comm = compute + fwd.compute, comm + fwd.comm
        comm += self.zero_fwd[device] * self._share(device, chunk)
        compute += self.host_microbatch / self.vpp
        return [("forward", compute), ("communication", comm)] + self._transfer(min(device, self.pp - 2))

    def backward(self, device: int, chunk: int) -> list[Piece]:
        """One micro-batch's backward of a chunk: the recomputed forward, the backward kernels, then TP
        collectives (the recomputation's too) and exposed ZeRO communication."""
        n, blk = self.chunk_layers[device][chunk], self.blocks[device]
        compute, comm = n * blk.backward.compute, n * (blk.backward.comm + blk.recompute.comm)
        for _, bwd in self._ends_of(device, chunk):
            compute, comm = compute + bwd.compute, comm + bwd.comm
        comm += self.zero_bwd[device] * self._share(device, chunk)
        return [("recompute", n * blk.recompute.compute), ("backward", compute), ("communication", comm)] + \
            self._transfer(max(device - 1, 0))

    def _transfer(self, hop: int) -> list[Piece]:
        """A blocking transfer is the device's time too (one per chunk pass): a forward sends on the hop to the
        next device, a backward on the hop to the previous one (the end devices' one hop both ways, as
        planner/cost/pipeline.py charges them)."""
        return [("p2p", self.hops[hop])] if self.blocking_p2p and self.pp > 1 else []

    @property
    def p2p(self) -> float:
        """The slowest hop's transfer (seconds; 0 with pp 1)."""
        return max(self.hops, default=0.0)

    @property
    def link_delays(self) -> list[float]:
        """The delay on each hop the simulation applies (0 when transfers block the devices instead)."""
        return [0.0 if self.blocking_p2p else c for c in self.hops] or [0.0]
