"""planner/parallel_dims.py against an independent construction of the mesh: numpy's arange laid out in the rank
order (fastest-varying axis last after reshaping, then transposed to (pp, dp, tp)), its slices as the groups, and
(pp, edp, ep, tp) = the same array with dp split as d = edp * ep + ep_rank; the plan's rank layout and the runtime's
reading of it."""

from itertools import permutations
from pathlib import Path

import numpy as np
import pytest

from planner.errors import InputError
from planner.layout import Layout
from planner.parallel_dims import AXES, ParallelDims, tied_embedding_pairs
from planner.specs import ParallelConfig

ROOT = Path(__file__).resolve().parents[1]
CASES = [(pp, dp, tp, ep, order) for pp, dp, tp, ep in [(1, 1, 1, 1), (2, 4, 2, 2), (3, 4, 2, 4), (2, 6, 1, 3),
                                                           (2, 2, 2, 1), (1, 8, 2, 2)]
         for order in permutations(AXES)]


def rank_array(pp: int, dp: int, tp: int, order: tuple[str, ...]) -> np.ndarray:
    """a[pp, dp, tp] = rank, with `order`'s first axis varying fastest."""
    sizes = {"pp": pp, "dp": dp, "tp": tp}
    slowest_first = order[::-1]
    a = np.arange(pp * dp * tp).reshape([sizes[x] for x in slowest_first])
    return a.transpose([slowest_first.index(x) for x in AXES])


def slices(a: np.ndarray, axis: int) -> set[tuple[int, ...]]:
    """Every 1-D slice of `a` along `axis`, in index order."""
    moved = np.moveaxis(a, axis, -1)
    return {tuple(int(r) for r in row) for row in moved.reshape(-1, moved.shape[-1])}


@pytest.mark.parametrize("pp,dp,tp,ep,order", CASES)
def test_rank_and_coordinates_against_the_enumerated_mesh(pp, dp, tp, ep, order):
    dims = ParallelDims(pp=pp, dp=dp, tp=tp, ep=ep, order=order)
    a = rank_array(pp, dp, tp, order)
    assert dims.world_size == a.size
    for (p, d, t), r in np.ndenumerate(a):
        assert dims.rank(pp=p, dp=d, tp=t) == r
        assert dims.coords(int(r)) == {"pp": p, "dp": d, "tp": t}
        assert (dims.coord(int(r), "edp"), dims.coord(int(r), "ep")) == (d // ep, d % ep)
    assert dims.mesh_ranks() == [int(r) for r in a.flatten()]


@pytest.mark.parametrize("pp,dp,tp,ep,order", CASES)
def test_groups_of_every_dimension_are_the_mesh_slices(pp, dp, tp, ep, order):
    dims = ParallelDims(pp=pp, dp=dp, tp=tp, ep=ep, order=order)
    a = rank_array(pp, dp, tp, order)
    split = a.reshape(pp, dp // ep, ep, tp)            # (pp, edp, ep, tp)
    want = {"pp": slices(a, 0), "dp": slices(a, 1), "tp": slices(a, 2),
            "edp": slices(split, 1), "ep": slices(split, 2)}
    for dim, groups in want.items():
        got = dims.groups(dim)
        assert set(got) == groups and len(got) == len(groups), dim
        assert 0 in got[0], dim                        # the first group holds rank 0
        for rank in (0, a.size - 1):
            assert rank in dims.group(dim, rank)
    # an EP group is ep consecutive data-parallel ranks; an expert-DP group the ranks holding the same experts
    for g in dims.groups("ep"):
        assert [dims.coords(r)["dp"] for r in g] == list(range(dims.coord(g[0], "edp") * ep,
                                                              dims.coord(g[0], "edp") * ep + ep))
    for g in dims.groups("edp"):
        assert {dims.coords(r)["dp"] % ep for r in g} == {dims.coord(g[0], "ep")}
    assert set(tied_embedding_pairs(dims)) == {(int(a[0, d, t]), int(a[pp - 1, d, t]))
                                               for d in range(dp) for t in range(tp)}


def test_mesh_shape_splits_dp_only_under_expert_parallelism():
    dense = ParallelDims(pp=2, dp=4, tp=2)
    assert (dense.mesh_dim_names, dense.mesh_shape, dense.flattened) == (("pp", "dp", "tp"), (2, 4, 2), {})
    moe = ParallelDims(pp=2, dp=4, tp=2, ep=2)
    assert moe.mesh_dim_names == ("pp", "edp", "ep", "tp") and moe.mesh_shape == (2, 2, 2, 2)
    assert moe.flattened == {"dp": ("edp", "ep")} and moe.edp == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"dp": 4, "ep": 3}, "ep: ep 3 does not divide dp 4"),
    ({"tp": 0}, "tp: must be a positive integer"),
    ({"order": ("tp", "dp", "dp")}, "layout: rank order"),
])
def test_bad_dimensions_are_one_line_errors(kwargs, message):
    with pytest.raises(InputError) as err:
        ParallelDims(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_layout_entries_place_each_rank_on_its_device():
    """The plan's rank_layout: rank r at its coordinate, on device devices[r] (node, local GPU)."""
    dims = ParallelDims(pp=2, dp=2, tp=2, order=("tp", "pp", "dp"))
    devices = tuple(reversed(range(8)))
    rows = Layout(dims, 4, devices).entries()
    a = rank_array(2, 2, 2, dims.order)
    assert [row["rank"] for row in rows] == list(range(8))
    for row in rows:
        assert a[row["pp"], row["dp"], row["tp"]] == row["rank"]
        assert row["node"] * 4 + row["local_gpu"] == 7 - row["rank"]
    group = Layout(dims, 4, devices).group("dp", all_groups=True)
    assert group.ranks == (7, 3) and group.nodes == 2 and len(group.peers) == 4


def test_a_plan_file_written_before_parallel_dims_still_loads_and_runs_the_same_ranks():
    """tests/data/plans/moe_tiny_pp2_dp4_ep2_9a8d039.json was written by `meshplan estimate -o` at commit 9a8d039
    (planner/layout.py's own (pp, dp, tp) strides, moe.py's own EP groups): every row's rank is ParallelDims' rank
    of its coordinate, and the runtime's rank -> process map reads it. (Its predicted step is not compared: the
    cost model's physics has changed since.)"""
    from planner.plan import load_plan
    from runtime.rank_layout import rank_devices, rank_grid

    plan = load_plan(ROOT / "tests" / "data" / "plans" / "moe_tiny_pp2_dp4_ep2_9a8d039.json")
    dims = plan.config.dims
    assert (dims.pp, dims.dp, dims.tp, dims.ep) == (2, 4, 1, 2)
    devices = rank_devices(plan)
    for row in plan.rank_layout:
        r = dims.rank(pp=row.pp, dp=row.dp, tp=row.tp)
        assert r == row.rank and devices[r] == row.node * plan.cluster.gpus_per_node + row.local_gpu
    assert rank_grid(plan) == rank_array(2, 4, 1, dims.order).tolist()
    swapped = [row.model_copy(update={"local_gpu": 3 - row.local_gpu}) for row in plan.rank_layout]
    moved = rank_devices(plan.model_copy(update={"rank_layout": swapped}))
    assert moved == tuple(r // 4 * 4 + 3 - r % 4 for r in range(8))


@pytest.mark.parametrize("tp,pp,dp", [(2, 3, 4), (1, 4, 6), (4, 2, 3), (3, 5, 2)])
@pytest.mark.parametrize("order", list(permutations(("tp", "dp", "pp"))))
def test_groups_by_residue_cover_every_groups_first_rank_modulo_the_node(tp, pp, dp, order):
    """Against the full list of groups: the same first ranks modulo the node size, each of them a real group."""
    dims = ParallelDims.of(ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=1), order)
    every = dims.groups("pp")
    for node in (4, 6, 8):
        some = dims.groups_by_residue("pp", node)
        assert set(some) <= set(every)
        assert sorted(g[0] % node for g in some) == sorted({g[0] % node for g in every})


@pytest.mark.parametrize("tp,pp,dp", [(3, 1, 8), (3, 2, 4), (6, 1, 4), (2, 3, 4)])
@pytest.mark.parametrize("order", list(permutations(("tp", "dp", "pp"))))
def test_a_layouts_group_is_its_slowest_one(tp, pp, dp, order):
    """On spec-sheet links the group that prices a collective spans the most nodes of all the groups along its
    dimension (brute force over every group): tp 3 on 8-GPU nodes puts ranks 6-8 across two nodes."""
    dims = ParallelDims.of(ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=1), order)
    layout = Layout(dims, 8)
    for dim in ("tp", "dp", "pp"):
        most = max(len({r // 8 for r in g}) for g in dims.groups(dim))
        assert layout.group(dim).nodes == most
    if order == ("tp", "dp", "pp") and (tp, pp) == (3, 1):
        assert layout.group("tp").nodes == 2 and dims.group("tp", 0) == (0, 1, 2)
