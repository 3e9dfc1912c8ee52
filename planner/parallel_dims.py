"""The parallel dimensions of a job: one object the planner's layout, the plan's rank layout and the runtime's
device mesh all read (torchtitan's `ParallelDims` plays this part there).

The world is the product of the axes in AXES, outermost first: the runtime's DeviceMesh has them in that order.
A sub-dimension splits one axis in two: expert parallelism splits data parallelism into (edp, ep), data-parallel
rank d = edp_rank * ep + ep_rank, so an EP group is `ep` consecutive data-parallel ranks and an expert-data-parallel
group the dp/ep ranks holding the same experts (Megatron-Core's and torchtitan's order). The rank order lists the
axes fastest-varying first: ("tp", "dp", "pp"), Megatron-LM's, makes TP groups consecutive ranks, DP next and
pipeline stages outermost. A new dimension (context parallelism) is one field and one entry in AXES (or SPLITS).

Imports nothing heavy: `runtime` builds its mesh from it on every rank.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import product
from math import prod
from operator import attrgetter

from planner.errors import InputError

AXES = ("pp", "dp", "tp")                  # the world's axes, outermost first (the device mesh's order)
DEFAULT_ORDER = ("tp", "dp", "pp")         # rank order, fastest-varying first (Megatron-LM's)
SPLITS = {"dp": ("edp", "ep")}             # axis -> (outer, inner) sub-dimensions; the inner degree is a field
DEGREES = AXES + tuple(inner for _, inner in SPLITS.values())     # the degree fields: pp, dp, tp, ep
_degrees_of = attrgetter(*DEGREES)


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallel dimension and the order ranks are numbered in. Ranks are the planner's global
    ranks 0..world_size-1; which device (process) runs each is the layout's business (planner/layout.py)."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    ep: int = 1                                # expert parallelism, inside dp
    order: tuple[str, ...] = DEFAULT_ORDER

    @classmethod
    def of(cls, config, order: tuple[str, ...] | list[str] | None = None) -> "ParallelDims":
        """The dimensions of anything with the degree fields (ParallelConfig, the search's Candidate), ranks in
        `order` (default Megatron-LM's)."""
        return _interned(cls, _degrees_of(config), tuple(order or DEFAULT_ORDER))

    def __post_init__(self):
        for name in DEGREES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"must be a positive integer (got {value!r})", field=name)
        if sorted(self.order) != sorted(AXES):
            raise InputError(f"rank order {list(self.order)} must list each of {', '.join(AXES)} once",
                             field="layout")
        for axis, (_, inner) in SPLITS.items():
            if getattr(self, axis) % getattr(self, inner):
                raise InputError(f"{inner} {getattr(self, inner)} does not divide {axis} {getattr(self, axis)}",
                                 field=inner)
        object.__setattr__(self, "_hash", hash((_degrees_of(self), self.order)))

    def __hash__(self) -> int:          # computed once: the cost model keys its caches on dimensions
        return self._hash

    # ------------------------------------------------------------------ sizes
    @property
    def world_size(self) -> int:
        return prod(getattr(self, a) for a in AXES)

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: ranks holding the same experts."""
        return self.dp // self.ep

    def size(self, dim: str) -> int:
        """Degree of an axis or a sub-dimension ('pp', 'dp', 'tp', 'edp', 'ep')."""
        for axis, (outer, inner) in SPLITS.items():
            if dim == outer:
                return getattr(self, axis) // getattr(self, inner)
        return getattr(self, dim)

    # ------------------------------------------------------------------ rank <-> coordinates
    @cached_property
    def _strides(self) -> dict[str, int]:
        out, s = {}, 1
        for a in self.order:
            out[a] = s
            s *= getattr(self, a)
        return out

    def stride(self, axis: str) -> int:
        """Rank distance between neighbours along `axis`."""
        return self._strides[axis]

    def rank(self, **coords: int) -> int:
        """The global rank at a coordinate of the axes (missing axes: 0)."""
        return sum(c * self._strides[a] for a, c in coords.items())

    def coords(self, rank: int) -> dict[str, int]:
        """The coordinate {axis: index} of a global rank."""
        return {a: rank // self._strides[a] % getattr(self, a) for a in AXES}

    def coord(self, rank: int, dim: str) -> int:
        """A rank's index along an axis or a sub-dimension (its rank inside that dimension's group)."""
        for axis, (outer, inner) in SPLITS.items():
            if dim in (outer, inner):
                d, n = self.coords(rank)[axis], getattr(self, inner)
                return d // n if dim == outer else d % n
        return self.coords(rank)[dim]

    # ------------------------------------------------------------------ groups
    @cached_property
    def _fine_strides(self) -> dict[str, int]:
        """Rank stride of every axis and sub-dimension, outermost first: a split axis's inner sub-dimension steps
        like the axis, its outer one `inner degree` times as far."""
        out = {}
        for a in AXES:
            if a in SPLITS:
                outer, inner = SPLITS[a]
                out[outer], out[inner] = self._strides[a] * getattr(self, inner), self._strides[a]
            else:
                out[a] = self._strides[a]
        return out

    def _offsets(self, dims: list[str]) -> list[int]:
        """Rank offsets of every coordinate of `dims` (the first outermost, the last fastest)."""
        out = [0]
        for d in dims:
            steps = [i * self._fine_strides[d] for i in range(self.size(d))]
            out = [o + step for o in out for step in steps]
        return out

    def _along(self, dim: str) -> list[str]:
        if dim not in self._fine_strides and dim not in AXES:
            raise InputError(f"unknown parallel dimension '{dim}' (one of {', '.join(self._fine_strides)})",
                             field="dim")
        return list(SPLITS.get(dim, (dim,)))

    def groups(self, dim: str) -> tuple[tuple[int, ...], ...]:
        """Every group of ranks along `dim` (an axis or a sub-dimension), each in its members' order along `dim`,
        the groups in the order of their other coordinates (outermost first); the first holds rank 0."""
        along = self._along(dim)
        members = self._offsets(along)
        rest = [d for d in self._fine_strides if d not in along]
        return tuple(tuple(base + m for m in members) for base in self._offsets(rest))

    def groups_by_residue(self, dim: str, modulus: int) -> tuple[tuple[int, ...], ...]:
        """One group along `dim` for each value its first rank takes modulo `modulus`: groups whose first ranks
        agree modulo the node size cross node boundaries alike, so these show every group's pattern (at most
        `modulus` groups, found without listing all world / size of them)."""
        along = self._along(dim)
        members = self._offsets(along)
        first = {0: 0}                       # first rank modulo `modulus` -> one first rank
        for d in (d for d in self._fine_strides if d not in along):
            stride = self._fine_strides[d]
            steps = min(self.size(d), modulus // math.gcd(stride, modulus))   # residues repeat after these
            for b in list(first.values()):
                for i in range(1, steps):
                    first.setdefault((b + i * stride) % modulus, b + i * stride)
        return tuple(tuple(b + m for m in members) for b in sorted(first.values()))

    def group(self, dim: str, rank: int = 0) -> tuple[int, ...]:
        """The group along `dim` that holds `rank`."""
        first = self._first_groups.get(dim)
        if first is None:
            first = self._first_groups[dim] = tuple(self._offsets(self._along(dim)))
        if rank == 0:
            return first
        base = rank - sum(self.coord(rank, d) * self._fine_strides[d] for d in self._along(dim))
        return tuple(base + m for m in first)

    @cached_property
    def _first_groups(self) -> dict[str, tuple[int, ...]]:
        return {}                        # dimension -> the group holding rank 0, filled by `group`

    # ------------------------------------------------------------------ the runtime's device mesh
    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        """Dimension names of the world mesh, outermost first: an axis is split into its sub-dimensions only when
        the split is real (ep > 1), so a dense job's mesh is ('pp', 'dp', 'tp')."""
        return tuple(d for a in AXES for d in (SPLITS[a] if self._split(a) else (a,)))

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(self.size(d) for d in self.mesh_dim_names)

    @property
    def flattened(self) -> dict[str, tuple[str, ...]]:
        """Mesh dimensions to flatten into one named axis (the data-parallel mesh over (edp, ep))."""
        return {a: SPLITS[a] for a in AXES if self._split(a)}

    def mesh_ranks(self) -> list[int]:
        """Global ranks in the mesh's row-major order (coordinates over AXES, the last fastest)."""
        return [self.rank(**dict(zip(AXES, c))) for c in product(*(range(getattr(self, a)) for a in AXES))]

    def _split(self, axis: str) -> bool:
        return axis in SPLITS and getattr(self, SPLITS[axis][1]) > 1


@lru_cache(maxsize=4096)
def _interned(cls, degrees: tuple[int, ...], order: tuple[str, ...]) -> ParallelDims:
    """One object per distinct dimensions: the search asks for the same few thousands of times (and its
    groups, cached on the object, are computed once)."""
    return cls(**dict(zip(DEGREES, degrees)), order=order)


def tied_embedding_pairs(dims: ParallelDims) -> tuple[tuple[int, int], ...]:
    """(first stage, last stage) ranks of each pipeline: with tied embeddings and pp > 1 they hold the two copies of
    the embedding matrix whose gradients are summed (Megatron-LM's embedding group); one pair per (dp, tp)."""
    return tuple((g[0], g[-1]) for g in dims.groups("pp"))
