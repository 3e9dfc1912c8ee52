"""Which process runs which rank of a plan's parallel dimensions, read from the plan's rank layout (torch-free:
`meshplan run` checks it before launching, checkpoints record it)."""

from __future__ import annotations

from planner.errors import InputError
from planner.parallel_dims import AXES
from planner.plan import Plan


def device_of(row, gpus_per_node: int) -> int:
    """The process (torchrun global rank) that runs a rank-layout row: node * gpus_per_node + local GPU.
    It is the row's rank unless the plan placed ranks on other devices."""
    return row.node * gpus_per_node + row.local_gpu


def rank_devices(plan: Plan) -> tuple[int, ...]:
    """devices[r] = the process (torchrun global rank, i.e. device node * gpus_per_node + local GPU) running rank r
    of the plan's parallel dimensions (plan.config.dims: the rank at each row's coordinate in the plan's rank
    order), from the plan's rank layout; InputError unless the layout maps the coordinates one-to-one onto ranks
    0..world-1 and onto devices 0..world-1."""
    dims = plan.config.dims
    gpn = plan.cluster.gpus_per_node
    world = dims.world_size
    sizes = " x ".join(f"{a} {dims.size(a)}" for a in AXES)
    devices: list[int | None] = [None] * world
    ranks, used = set(), set()
    for row in plan.rank_layout:
        coords = {a: getattr(row, a) for a in AXES}
        where = ", ".join(f"{a} {c}" for a, c in coords.items())
        if not all(0 <= c < dims.size(a) for a, c in coords.items()):
            raise InputError(f"rank {row.rank} has coordinate ({where}) outside {sizes}", field="rank_layout")
        if not 0 <= row.rank < world or row.rank in ranks:
            raise InputError(f"rank {row.rank} is out of range or listed twice (world size {world})",
                             field="rank_layout")
        device = device_of(row, gpn)
        if not 0 <= row.local_gpu < gpn or not 0 <= device < world or device in used:
            raise InputError(f"rank {row.rank} is placed on node {row.node} GPU {row.local_gpu}, outside the "
                             f"{world} devices or on a device given to another rank", field="rank_layout")
        rank = dims.rank(**coords)
        if devices[rank] is not None:
            raise InputError(f"coordinate ({where}) is given to two ranks", field="rank_layout")
        ranks.add(row.rank)
        used.add(device)
        devices[rank] = device
    if len(ranks) != world:
        raise InputError(f"the rank layout lists {len(ranks)} ranks; {' * '.join(AXES)} = {world}",
                         field="rank_layout")
    return tuple(devices)


def rank_grid(plan: Plan) -> list:
    """grid[pp][dp][tp] (nested over planner/parallel_dims.py's AXES) = the process holding that coordinate
    (rank_devices, in the device mesh's order)."""
    dims = plan.config.dims
    devices = rank_devices(plan)
    grid = [devices[r] for r in dims.mesh_ranks()]
    for a in reversed(AXES[1:]):
        n = dims.size(a)
        grid = [grid[i:i + n] for i in range(0, len(grid), n)]
    return grid
