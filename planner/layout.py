"""Where each (pp, dp, tp) coordinate lives: global rank, node and local GPU.

A layout is an order of the three axes, fastest-varying first. The default ("tp", "dp", "pp") is
Megatron-LM's: TP groups are consecutive ranks (inside a node), DP next, pipeline stages outermost.
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

    def group(self, axis: str, pp: int = 0, dp: int = 0, tp: int = 0) -> Group:
        """The group along `axis` through the given coordinate (rank 0's by default)."""
        coords = {"pp": pp, "dp": dp, "tp": tp}
        ranks = []
        for i in range(self.size(axis)):
            coords[axis] = i
            ranks.append(self.rank(**coords))
        return Group.of(tuple(ranks), self.gpus_per_node)

    def entries(self) -> list[dict[str, int]]:
        """Every rank with its coordinate, node and local GPU index, sorted by rank."""
        rows = []
        for pp, dp, tp in product(range(self.pp), range(self.dp), range(self.tp)):
            r = self.rank(pp, dp, tp)
            rows.append({"rank": r, "pp": pp, "dp": dp, "tp": tp, "node": r // self.gpus_per_node,
                         "local_gpu": r % self.gpus_per_node})
        return sorted(rows, key=lambda row: row["rank"])
