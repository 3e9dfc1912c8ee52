"""Where each (pp, dp, tp) coordinate lives: global rank, node and local GPU.

A layout is an order of the three axes, fastest-varying first. The default ("tp", "dp", "pp") is
Megatron-LM's: TP groups are consecutive ranks (inside a node), DP next, pipeline stages outermost.
Rank r runs on device r (node r // gpus_per_node) unless `devices` gives another device for each rank:
the placement search uses that to move ranks onto faster measured links.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from planner.cost.comm import Group

AXES = ("pp", "dp", "tp")
DEFAULT_ORDER = ("tp", "dp", "pp")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    gpus_per_node: int
    order: tuple[str, str, str] = DEFAULT_ORDER
    devices: tuple[int, ...] | None = None     # device of each rank; None: rank r on device r

    def device(self, rank: int) -> int:
        return rank if self.devices is None else self.devices[rank]

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def stride(self, axis: str) -> int:
        s = 1
        for a in self.order:
            if a == axis:
                return s
            s *= self.size(a)
        raise ValueError(axis)

    def rank(self, pp: int, dp: int, tp: int) -> int:
        coords = {"pp": pp, "dp": dp, "tp": tp}
        return sum(coords[a] * self.stride(a) for a in AXES)

    def _devices_along(self, axis: str, coords: dict[str, int]) -> tuple[int, ...]:
        out = []
        for i in range(self.size(axis)):
            coords[axis] = i
            out.append(self.device(self.rank(**coords)))
        return tuple(out)

    def group(self, axis: str, all_groups: bool = False) -> Group:
        """The group along `axis` through rank 0, as devices; with `all_groups`, every parallel group along the
        axis rides along as its peers (a measured network is as slow as its slowest group)."""
        peers = ()
        if all_groups:
            others = [a for a in AXES if a != axis]
            peers = tuple(self._devices_along(axis, {others[0]: i, others[1]: j})
                          for i in range(self.size(others[0])) for j in range(self.size(others[1])))
        return Group.of(self._devices_along(axis, {"pp": 0, "dp": 0, "tp": 0}), self.gpus_per_node, peers)

    def entries(self) -> list[dict[str, int]]:
        """Every rank with its coordinate, node and local GPU index, sorted by rank."""
        rows = []
        for pp, dp, tp in product(range(self.pp), range(self.dp), range(self.tp)):
            r = self.rank(pp, dp, tp)
            d = self.device(r)
            rows.append({"rank": r, "pp": pp, "dp": dp, "tp": tp, "node": d // self.gpus_per_node,
                         "local_gpu": d % self.gpus_per_node})
        return sorted(rows, key=lambda row: row["rank"])
