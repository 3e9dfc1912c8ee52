"""`torchrun --nproc-per-node 4 tests/moe_worker.py OUT`: runtime/moe.py's MoE MLP with expert parallelism 2 inside
data parallelism 4 (EP groups {0,1} {2,3}, expert-data-parallel groups {0,2} {1,3}), and with tensor (and sequence)
parallelism 2 times expert parallelism 2 (TP groups {0,1} {2,3}, EP groups {0,2} {1,3}), against the same module on
one process over the whole batch; and the runtime's device mesh (runtime/parallelize.py device_mesh) against the
planner's groups (planner/parallel_dims.py) for 4-process layouts; writes the largest relative errors (over ranks)
and the mesh mismatches to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.parallel_dims import ParallelDims  # noqa: E402
from runtime.moe import MoEMLP  # noqa: E402
from runtime.parallelize import device_mesh  # noqa: E402

H, FFN, EXPERTS, TOP_K, TOKENS = 16, 24, 4, 2, 12      # TOKENS per rank


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def case(rank: int, world: int, ep_group, edp_group, shared: int, skew: float) -> dict[str, float]:
    torch.manual_seed(1)
    ref = MoEMLP(H, FFN, EXPERTS, TOP_K, shared)
    with torch.no_grad():
        ref.router.weight[0] += skew          # skewed routing: expert 0 takes most tokens, others few or none
    x, y = torch.randn(world * TOKENS, H), torch.randn(world * TOKENS, H)
    out_ref = ref(x)
    ((out_ref - y) ** 2).sum().div(world * TOKENS).backward()

    mod = MoEMLP(H, FFN, EXPERTS, TOP_K, shared, ep_group=ep_group)
    mod.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("experts.")}, strict=False)
    mod.load_experts(ref.experts.gate, ref.experts.up, ref.experts.down)
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
    out = mod(x[mine])
    ((out - y[mine]) ** 2).sum().div(world * TOKENS).backward()
    experts = {"experts.gate", "experts.up", "experts.down"}
    unreduced = max(rel(mod.experts.gate.grad, ref.experts.gate.grad[mod.rank * mod.local:][:mod.local]), 0.0)
    for name, p in mod.named_parameters():
        dist.all_reduce(p.grad, group=edp_group if name in experts else None)
    errors = {"output": rel(out, out_ref[mine]), "unreduced_expert_grad": unreduced}
    lo = mod.rank * mod.local
    for name, p in mod.named_parameters():
        whole = dict(ref.named_parameters())[name].grad
        errors[f"grad {name}"] = rel(p.grad, whole[lo:lo + mod.local] if name in experts else whole)
    return errors


def tp_case(mesh, shared: int, skew: float) -> dict[str, float]:
    """Tensor parallelism 2 x expert parallelism 2 on the ("ep", "tp") mesh: EP rank r holds tokens
    [r T, (r + 1) T) of the batch, TP rank t its sequence half; the router's and shared expert's gradients are
    summed over the EP (here: data-parallel) group by hand, over TP by DTensor."""
    torch.manual_seed(2)
    ep, tp = mesh["ep"], mesh["tp"]
    ref = MoEMLP(H, FFN, EXPERTS, TOP_K, shared)
    with torch.no_grad():
        ref.router.weight[0] += skew
    x, y = torch.randn(2, 2 * TOKENS, H), torch.randn(2, 2 * TOKENS, H)      # [ep rank, sequence, h]
    out_ref = ref(x)
    ((out_ref - y) ** 2).sum().div(x.numel() / H).backward()

    mod = MoEMLP(H, FFN, EXPERTS, TOP_K, shared, ep_group=ep.get_group())
    mod.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("experts.")}, strict=False)
    mod.load_experts(ref.experts.gate, ref.experts.up, ref.experts.down)
    mod.shard_for_tensor_parallel(tp)
    r, t = ep.get_local_rank(), tp.get_local_rank()
    rows = slice(t * TOKENS, (t + 1) * TOKENS)
    out = mod(x[r:r + 1, rows])
    ((out - y[r:r + 1, rows]) ** 2).sum().div(x.numel() / H).backward()
    errors = {"output": rel(out, out_ref[r:r + 1, rows])}
    lo = mod.rank * mod.local
    for name, p in mod.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if not name.startswith("experts."):
            dist.all_reduce(grad, group=ep.get_group())
        whole = dict(ref.named_parameters())[name].grad
        errors[f"grad {name}"] = rel(grad, whole[lo:lo + mod.local] if name.startswith("experts.") else whole)
    return errors


# (dims, devices[r] = the process running rank r): pp2 dp2(ep2) in Megatron's and in (tp, pp, dp) order, on moved
# processes; dp2(ep2) tp2; dp4(ep2)
MESH_LAYOUTS = [
    (ParallelDims(pp=2, dp=2, tp=1, ep=2), (0, 1, 2, 3)),
    (ParallelDims(pp=2, dp=2, tp=1, ep=2, order=("tp", "pp", "dp")), (3, 2, 1, 0)),
    (ParallelDims(pp=1, dp=2, tp=2, ep=2), (1, 3, 0, 2)),
    (ParallelDims(pp=1, dp=4, tp=1, ep=2), (2, 0, 3, 1)),
]


def mesh_mismatches(process: int) -> tuple[int, int]:
    """(checks, mismatches) of every mesh dimension ('pp', 'dp', 'tp', 'edp', 'ep') of every MESH_LAYOUTS entry on
    this process: the sub-mesh's processes in mesh order, its process group's members and this process's mesh
    coordinate, against the planner's group of this rank and its coordinate along the dimension. (The process
    group's own rank order is sorted by process, so it differs from the coordinate on moved processes.)"""
    checks = mismatches = 0
    for dims, devices in MESH_LAYOUTS:
        mesh = device_mesh(dims, devices, "cpu")
        rank = devices.index(process)
        for dim in ("pp", "dp", "tp", "edp", "ep"):
            want = [devices[r] for r in dims.group(dim, rank)]
            sub = mesh[dim]
            got = sub.mesh.flatten().tolist()
            members = sorted(dist.get_process_group_ranks(sub.get_group()))
            checks += 1
            mismatches += (got != want or members != sorted(want)
                           or tuple(sub.get_coordinate()) != (dims.coord(rank, dim),))
    return checks, mismatches


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    edp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    results = {}
    for shared, skew in ((0, 0.0), (8, 0.0), (0, 3.0)):
        errors = case(rank, world, ep_groups[rank // 2], edp_groups[rank % 2], shared, skew)
        worst = torch.tensor(list(errors.values()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results[f"shared {shared}, skew {skew}"] = dict(zip(errors, worst.tolist()))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    for shared, skew in ((8, 0.0), (8, 3.0)):
        errors = tp_case(mesh, shared, skew)
        worst = torch.tensor(list(errors.values()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results[f"tp2 ep2, shared {shared}, skew {skew}"] = dict(zip(errors, worst.tolist()))
    counts = torch.tensor(mesh_mismatches(rank))
    dist.all_reduce(counts)
    results["mesh groups"] = dict(zip(("checks", "mismatches"), counts.tolist()))
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
