"""Where each rank of a job's parallel dimensions (planner/parallel_dims.py) lives: node and local GPU.

Rank r runs on device r (node r // gpus_per_node) unless `devices` gives another device for each rank:
the placement search uses that to move ranks onto faster measured links.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.comm import Group
from planner.parallel_dims import AXES, DEFAULT_ORDER, ParallelDims

__all__ = ["AXES", "DEFAULT_ORDER", "Layout", "ORDERED_DIMS", "reversed_group"]

# Mesh dimensions whose shards PyTorch gathers in process order: DTensor's TP shards, FSDP2's DP and expert-DP
# shards (the pipeline maps stages to processes itself; the all-to-all numbers EP ranks by its own group).
ORDERED_DIMS = ("tp", "dp", "edp")


def reversed_group(dims: ParallelDims, devices: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """The first TP, DP or expert-DP group (dimension, ranks) whose devices do not increase along it, None when
    every one does. A DeviceMesh sub-group numbers its members by process (torch.distributed.new_group sorts
    them), so `meshplan run` can only run placements where none is reversed."""
    for dim in ORDERED_DIMS:
        for group in dims.groups(dim):
            processes = [devices[r] for r in group]
            if processes != sorted(processes):
                return dim, group
    return None


@dataclass(frozen=True)
class Layout:
    dims: ParallelDims
    gpus_per_node: int
    devices: tuple[int, ...] | None = None     # device of each rank; None: rank r on device r

    def device(self, rank: int) -> int:
        return rank if self.devices is None else self.devices[rank]

    def on_devices(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return ranks if self.devices is None else tuple(self.devices[r] for r in ranks)

    def group(self, dim: str, all_groups: bool = False) -> Group:
        """The group along `dim` (an axis, 'ep' or 'edp') that sets the pace, as devices: with `all_groups`, the
        one through rank 0 with every parallel group along the dimension as its peers (a measured network is as
        slow as its slowest group); else the one spanning the most nodes (rank 0's among equals: on spec-sheet
        links a group's time depends on its node count, and a group of a size that does not divide the node,
        tp 3 on 8-GPU nodes say, spans one node or two by where it starts)."""
        if all_groups:
            peers = tuple(self.on_devices(g) for g in self.dims.groups(dim))
            return Group.of(self.on_devices(self.dims.group(dim, 0)), self.gpus_per_node, peers)
        gpn = self.gpus_per_node
        if self.devices is None:
            ranks = max(self.dims.groups_by_residue(dim, gpn), key=lambda g: len({r // gpn for r in g}))
        else:
            ranks = max(self.dims.groups(dim), key=lambda g: len({self.devices[r] // gpn for r in g}))
        return Group.of(self.on_devices(ranks), gpn)

    def entries(self) -> list[dict[str, int]]:
        """Every rank with its coordinate, node and local GPU index, sorted by rank (the plan's rank_layout)."""
        rows = []
        for r in range(self.dims.world_size):
            d = self.device(r)
            rows.append({"rank": r, **self.dims.coords(r), "node": d // self.gpus_per_node,
                         "local_gpu": d % self.gpus_per_node})
        return rows
