"""Where each (pp, dp, tp) coordinate lives: global rank, node and local GPU.

A layout is an order of the three axes, fastest-varying first. The default ("tp", "dp", "pp") is
Megatron-LM's: TP groups are consecutive ranks (inside a node), DP next, pipeline stages outermost.
Rank r runs on device r (node r // gpus_per_node) unless `devices` gives another device for each rank:
the placement search uses that to move ranks onto faster measured links.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def _strides(self) -> tuple[int, int, int]:
        """Rank strides of (pp, dp, tp)."""
        out, s = {}, 1
        for a in self.order:
            out[a] = s
            s *= self.size(a)
        return out["pp"], out["dp"], out["tp"]

    def stride(self, axis: str) -> int:
        return self._strides[AXES.index(axis)]

    def rank(self, pp: int, dp: int, tp: int) -> int:
        s_pp, s_dp, s_tp = self._strides
        return pp * s_pp + dp * s_dp + tp * s_tp

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
