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

Not yet wired into `meshplan run` (runtime/checks.py refuses MoE plans): tests/test_runtime_moe.py checks it
against a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime.models import INIT_STD


class MoEMLP(nn.Module):
    """Routed experts (`experts` of them in all, `experts // ep` held here) of width `ffn`, top-`top_k` routing,
    `shared_ffn` > 0 adds a shared SwiGLU expert of that width."""

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, shared_ffn: int = 0,
                 ep_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.ep_group = ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if experts % self.ep:
            raise ValueError(f"ep {self.ep} does not divide {experts} experts")
        self.experts, self.top_k, self.local = experts, top_k, experts // self.ep
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate = nn.Parameter(torch.empty(self.local, hidden, ffn))
        self.up = nn.Parameter(torch.empty(self.local, hidden, ffn))
        self.down = nn.Parameter(torch.empty(self.local, ffn, hidden))
        self.shared = None
        if shared_ffn:
            self.shared = nn.ModuleDict({"gate": nn.Linear(hidden, shared_ffn, bias=False),
                                         "up": nn.Linear(hidden, shared_ffn, bias=False),
                                         "down": nn.Linear(shared_ffn, hidden, bias=False)})
        for p in self.parameters():
            nn.init.normal_(p, std=INIT_STD)

    def load_experts(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Take this rank's slice of every expert's weights ([experts, ...] each)."""
        lo = self.rank * self.local
        with torch.no_grad():
            for mine, whole in ((self.gate, gate), (self.up, up), (self.down, down)):
                mine.copy_(whole[lo:lo + self.local])

    def _run_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each local expert on its consecutive block of `rows` (counts[e] rows for expert e)."""
        outs = []
        for e, block in enumerate(torch.split(rows, counts)):
            outs.append((F.silu(block @ self.gate[e]) * (block @ self.up[e])) @ self.down[e])
        return torch.cat(outs) if outs else rows

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
        # arrived is grouped by source rank, then by expert: regroup by expert, then source
        starts = torch.cumsum(recv.flatten(), 0) - recv.flatten()
        blocks = [(int(starts[s * local + e]), int(recv[s, e])) for e in range(local) for s in range(ep)]
        perm = torch.cat([torch.arange(a, a + n) for a, n in blocks]) if blocks else torch.arange(0)
        out = self._run_experts(arrived[perm], recv.sum(0).tolist())
        back = out[torch.argsort(perm)]
        return all_to_all_single(back, send_splits, recv_splits, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)          # the k copies of every token, sorted by expert
        rows = x[order // self.top_k]
        counts = torch.bincount(flat, minlength=self.experts)
        if self.ep == 1:
            out = self._run_experts(rows, counts.tolist())
        else:
            out = self._exchange(rows, counts)
        out = out[torch.argsort(order)].view(-1, self.top_k, shape[-1])
        y = (out * weights.unsqueeze(-1)).sum(1)
        if self.shared is not None:
            s = self.shared
            y = y + s["down"](F.silu(s["gate"](x)) * s["up"](x))
        return y.reshape(shape)
