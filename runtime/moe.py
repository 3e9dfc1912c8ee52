"""A mixture-of-experts MLP (router, routed SwiGLU experts, optional shared expert), dropless, with expert
parallelism by all-to-all over an EP process group: the block planner/cost/moe.py costs.

Routing: softmax over the E router logits, the top k per token, their weights renormalised to sum to one
(Mixtral; Qwen3-MoE's norm_topk_prob). Every routed copy is computed (no capacity, no dropped tokens). Under
expert parallelism over `ep` ranks, rank r holds experts [r E/ep, (r+1) E/ep); a forward sorts the k copies of
its tokens by expert, exchanges the per-expert counts, sends each rank the copies for its experts
(all_to_all_single with uneven splits, torch's differentiable functional collective), runs its experts on what it
received, sends the outputs back the same way and combines them with the router weights. The backward runs the
two all-to-alls in reverse (autograd). Expert gradients then hold the contributions of every rank of the EP group;
reducing them over the ranks that hold the same experts (the expert-data-parallel group) and the other
parameters over the whole data-parallel group is the caller's (as for dense data parallelism).

Under tensor parallelism (`shard_for_tensor_parallel`; with sequence parallelism, which Megatron-Core requires for
MoE with tp > 1) the block's input is this TP rank's sequence shard. The router runs on it (its weight
replicated over TP, its gradient summed over TP by DTensor, as a sequence-parallel norm's), the EP dispatch sends
the shard's routed copies, and the rows that arrive are gathered over the TP group; every expert's gate and up
are column-sharded and its down row-sharded over TP (expert tensor parallelism = tp, Megatron-Core's default), so
each TP rank computes a partial sum of every gathered row, and the partial sums are reduce-scattered back to the
ranks that gathered them before the EP combine. The shared expert runs as a dense sequence-parallel MLP (all-gather,
column / row sharded, reduce-scatter). This is the order planner/cost/moe.py prices. The gather and the
reduce-scatter move uneven row counts, so they are all-to-alls of the same volume (the gather sends a rank's rows to
each TP peer; the reduce-scatter sends each peer its rows' partial sums, summed on arrival).

The routed experts live in their own module (`GroupedExperts`) so that data parallelism can reduce their gradients
over the expert-data-parallel group and everything else over the data-parallel group (runtime/parallelize.py).
runtime/models.py builds it for the MoE layers of a spec; tests/test_runtime_moe.py checks it against a per-token
loop and a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from runtime.models import INIT_STD, SwiGLUFunction


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class GroupedExperts(nn.Module):
    """`local` SwiGLU experts of width `ffn`: gate, up [local, hidden, ffn] and down [local, ffn, hidden]; each keeps
    its rows, gate, up and their product for backward (silu recomputed, runtime.models.SwiGLUFunction).

    `grad_scale` multiplies the gradients of the weights (1 / ep under expert parallelism: an EP rank's expert
    gradient already sums the contributions of the ep ranks' tokens, and the data-parallel average over the dp/ep
    expert-data-parallel ranks must come out as the mean over all dp ranks)."""

    def __init__(self, local: int, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(local, hidden, ffn))
        self.up = nn.Parameter(torch.empty(local, hidden, ffn))
        self.down = nn.Parameter(torch.empty(local, ffn, hidden))
        self.grad_scale = 1.0

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each local expert on its consecutive block of `rows` (counts[e] rows for expert e); under tensor
        parallelism on this TP rank's shards of the weights (the output is then a partial sum over TP)."""
        gate, up, down = (w.to_local() if isinstance(w, DTensor) else w for w in (self.gate, self.up, self.down))
        if self.grad_scale != 1.0 and torch.is_grad_enabled():
            gate, up, down = (_ScaleGrad.apply(w, self.grad_scale) for w in (gate, up, down))
        outs = []
        for e, block in enumerate(torch.split(rows, counts)):
            outs.append(SwiGLUFunction.apply(block @ gate[e], block @ up[e]) @ down[e])
        return torch.cat(outs) if outs else rows


class SharedExpert(nn.Module):
    """The shared SwiGLU expert every token passes through: down(silu(gate x) * up x), width `ffn` (keeping gate
    and up for backward, as the dense MLP does)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(SwiGLUFunction.apply(self.gate(x), self.up(x)))


def expert_major(table: torch.Tensor, total: int) -> torch.Tensor:
    """Rows arrive grouped by source, then by expert (table[s, e] rows from source s for expert e, `total` of
    them): the permutation that groups them by expert, then source. Computed on the table's device without
    reading it back (`total` sizes the output), so it costs no host synchronisation."""
    flat = table.flatten()
    starts = torch.cumsum(flat, 0) - flat                 # where block (s, e) begins among the arrived rows
    lengths = table.t().flatten()                         # blocks in expert-major order
    firsts = starts.view(table.shape).t().flatten()
    offsets = torch.cumsum(lengths, 0) - lengths          # where each block begins in the permuted order
    block_start = torch.repeat_interleave(firsts - offsets, lengths, output_size=total)
    return block_start + torch.arange(total, device=table.device)


class MoEMLP(nn.Module):
    """Routed experts (`experts` of them in all, `experts // ep` held here) of width `ffn`, top-`top_k` routing,
    `shared_ffn` > 0 adds a shared SwiGLU expert of that width. `tp_degree` > 1 builds the local shapes of one
    TP shard (expert and shared widths / tp) with no communication, for profiling; real tensor parallelism
    shards the full module (`shard_for_tensor_parallel`)."""

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, shared_ffn: int = 0,
                 ep_group: dist.ProcessGroup | None = None, tp_degree: int = 1):
        super().__init__()
        self.tp_group, self.tp = None, 1
        self.ep_group = ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if experts % self.ep:
            raise ValueError(f"ep {self.ep} does not divide {experts} experts")
        self.num_experts, self.top_k, self.local = experts, top_k, experts // self.ep
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = GroupedExperts(self.local, hidden, ffn // tp_degree)
        self.shared = SharedExpert(hidden, shared_ffn // tp_degree) if shared_ffn else None
        for p in self.parameters():
            nn.init.normal_(p, std=INIT_STD)

    def shard_for_tensor_parallel(self, tp_mesh) -> None:
        """Tensor parallelism with sequence parallelism over the 1-D `tp_mesh` (the module then takes and returns
        this rank's sequence shard [b, s/tp, h] as a plain tensor): router replicated, shared expert column /
        row sharded, every routed expert's gate and up sharded along their width (column) and down along its
        input (row). `tp_mesh` must come from the device mesh whose 'edp' dimension shards the experts' data
        parallelism, so that FSDP2 composes with it."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel, parallelize_module)
        seq = Shard(1)
        plan = {"router": SequenceParallel(use_local_output=True)}
        if self.shared is not None:
            plan.update({"shared": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                         "shared.gate": ColwiseParallel(), "shared.up": ColwiseParallel(),
                         "shared.down": RowwiseParallel(output_layouts=seq)})
        parallelize_module(self, tp_mesh, plan)
        ex = self.experts
        for name, dim in (("gate", 2), ("up", 2), ("down", 1)):
            ex.register_parameter(name, nn.Parameter(distribute_tensor(getattr(ex, name), tp_mesh, [Shard(dim)])))
        self.tp_group, self.tp = tp_mesh.get_group(), tp_mesh.size()

    def load_experts(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Take this rank's slice of every expert's weights ([experts, ...] each)."""
        lo = self.rank * self.local
        with torch.no_grad():
            ex = self.experts
            for mine, whole in ((ex.gate, gate), (ex.up, up), (ex.down, down)):
                mine.copy_(whole[lo:lo + self.local])

    def _exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send the expert-sorted `rows` (counts[e] for global expert e) to the ranks holding their experts, run
        the local experts on what arrives, and bring the outputs back in the same order."""
        from torch.distributed._functional_collectives import all_to_all_single   # differentiable (torchtitan's)
        ep, local, group = self.ep, self.local, self.ep_group
        send = counts.view(ep, local)                      # rows for each destination rank's each expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=group)      # [source rank, local expert]
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = all_to_all_single(rows, recv_splits, send_splits, group)
        perm = expert_major(recv, sum(recv_splits))       # arrived is grouped by source rank, then expert
        out = self._run_experts(arrived[perm], recv.sum(0))
        back = out[torch.argsort(perm)]
        return all_to_all_single(back, send_splits, recv_splits, group)

    def _run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on expert-sorted `rows` (counts[e] for local expert e). Under tensor parallelism the
        TP group's rows are gathered, each rank computes its shard of every expert on all of them, and each
        rank's rows come back summed over the TP ranks' partial outputs."""
        if self.tp == 1:
            return self.experts(rows, counts.tolist())
        from torch.distributed._functional_collectives import all_to_all_single   # differentiable
        tp, group, n = self.tp, self.tp_group, rows.shape[0]
        table = [torch.empty_like(counts) for _ in range(tp)]
        dist.all_gather(table, counts.contiguous(), group=group)
        table = torch.stack(table)                           # [TP rank, local expert]
        sizes = table.sum(1).tolist()
        gathered = all_to_all_single(rows.repeat(tp, 1), sizes, [n] * tp, group)   # backward: reduce-scatter
        perm = expert_major(table, sum(sizes))
        partial = self.experts(gathered[perm], table.sum(0).tolist())[torch.argsort(perm)]
        scattered = all_to_all_single(partial, [n] * tp, sizes, group)   # my rows' partial sum from every rank
        return scattered.view(tp, n, -1).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] (under tensor parallelism this rank's sequence shard [b, s/tp, h]) -> the same shape."""
        shape = x.shape
        logits = self.router(x)
        shared = self.shared(x) if self.shared is not None else None
        x = x.reshape(-1, shape[-1])
        probs = logits.reshape(x.shape[0], -1).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)          # the k copies of every token, sorted by expert
        rows = x[order // self.top_k]
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.ep == 1:
            out = self._run_experts(rows, counts)
        else:
            out = self._exchange(rows, counts)
        out = out[torch.argsort(order)].view(-1, self.top_k, shape[-1])
        y = (out * weights.unsqueeze(-1)).sum(1).reshape(shape)
        return y + shared if shared is not None else y


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """{parameter name: the name its value is checkpointed under} for the routed experts of every MoE MLP in
    `model` whose experts are sharded over EP ranks: 'layers.3.mlp.experts.gate' of the rank holding experts 2
    and 3 of 4 is 'layers.3.mlp.experts[2:4].gate', so that each EP rank's experts are their own entry (the
    same name on every EP rank would make them one tensor to the checkpoint)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoEMLP) and mod.ep > 1:
            lo = mod.rank * mod.local
            for leaf in ("gate", "up", "down"):
                out[f"{name}.experts.{leaf}"] = f"{name}.experts[{lo}:{lo + mod.local}].{leaf}"
    return out
