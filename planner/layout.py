"""Where each rank of a job's parallel dimensions (planner/parallel_dims.py) lives: node and local GPU.

Rank r runs on device r (node r // gpus_per_node) unless `devices` gives another device for each rank:
the placement search uses that to move ranks onto faster measured links.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.comm import Group
from planner.parallel_dims import AXES, DEFAULT_ORDER, ParallelDims

__all__ = ["AXES", "DEFAULT_ORDER", "Layout"]


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
        """The group along `dim` (an axis, 'ep' or 'edp') through rank 0, as devices; with `all_groups`, every
        parallel group along the dimension rides along as its peers (a measured network is as slow as its
        slowest group)."""
        peers = tuple(self.on_devices(g) for g in self.dims.groups(dim)) if all_groups else ()
        return Group.of(self.on_devices(self.dims.group(dim, 0)), self.gpus_per_node, peers)

    def entries(self) -> list[dict[str, int]]:
        """Every rank with its coordinate, node and local GPU index, sorted by rank (the plan's rank_layout)."""
        rows = []
        for r in range(self.dims.world_size):
            d = self.device(r)
            rows.append({"rank": r, **self.dims.coords(r), "node": d // self.gpus_per_node,
                         "local_gpu": d % self.gpus_per_node})
        return rows
