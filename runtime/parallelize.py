"""Apply a plan's parallelism to the model chunks of one rank with PyTorch's own APIs.

Order (torchtitan's, and the one DESIGN.md Sec. 7 verified on CPU/gloo): build each chunk on the meta
device, tensor parallelism (`parallelize_module`, colwise/rowwise, sequence parallel), activation
checkpointing (a per-block switch), data parallelism (FSDP2 `fully_shard` for ZeRO 1-3, FSDP2-based
`replicate` for ZeRO 0, both of which accept TP's DTensor parameters), then materialise the parameters
and initialise them from the full model's deterministic values. Pipeline stages wrap the result
(`runtime.pipeline`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from planner.parallel_dims import ParallelDims, tied_embedding_pairs
from planner.plan import Plan
from runtime.rank_layout import rank_devices
from runtime.models import ModelChunk, init_weights


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def device_mesh(dims: ParallelDims, devices: tuple[int, ...], device_type: str) -> DeviceMesh:
    """The world's DeviceMesh of `dims` (dimensions dims.mesh_dim_names: ('pp', 'dp', 'tp'), or ('pp', 'edp', 'ep',
    'tp') under expert parallelism with 'dp' flattened from ('edp', 'ep')), rank r of `dims` on process
    devices[r]; so every sub-mesh's group is the planner's group of that dimension (ParallelDims.groups)."""
    grid = torch.tensor([devices[r] for r in dims.mesh_ranks()], dtype=torch.int).view(dims.mesh_shape)
    mesh = DeviceMesh(device_type, grid, mesh_dim_names=dims.mesh_dim_names)
    for name, parts in dims.flattened.items():
        mesh[parts]._flatten(name)
    return mesh


def build_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """The plan's DeviceMesh, each rank on the process (device) the plan's rank layout gives it."""
    return device_mesh(plan.config.dims, rank_devices(plan), device_type)


@dataclass(frozen=True)
class Coords:
    pp: int
    dp: int
    tp: int


def my_coords(plan: Plan, process_rank: int) -> Coords:
    """The (pp, dp, tp) coordinate the plan gives to the process with this torchrun global rank."""
    return Coords(**plan.config.dims.coords(rank_devices(plan).index(process_rank)))


# ----------------------------------------------------------------------------------------------
# Tensor parallelism
# ----------------------------------------------------------------------------------------------
def apply_tensor_parallel(chunk: ModelChunk, tp_mesh: DeviceMesh, sp: bool, loss_parallel: bool) -> None:
    """Megatron-style TP (Shoeybi et al. 2019) on one chunk: q/k/v, fc1 (gate/up) column-parallel,
    output and fc2 (down) projections row-parallel, the token embedding and the LM head split by
    vocabulary. With `sp` the norms, dropouts and residual stream are sharded along the sequence
    (Korthikanti et al. 2022): one all-gather before attention and before the MLP, one reduce-scatter
    after each. With `loss_parallel` the head's logits stay vocabulary-sharded (a DTensor) for
    `torch.distributed.tensor.parallel.loss_parallel`. A mixture-of-experts MLP (which needs `sp`) takes the
    sequence shard as it is and shards itself (runtime.moe.MoEMLP.shard_for_tensor_parallel), its routed experts over
    the same `tp_mesh`: one device mesh holds tp and the expert-data-parallel dimension, so FSDP2 composes with it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    from runtime.moe import MoEMLP
    seq_shard = Shard(1)
    for block in chunk.layers.values():
        plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=seq_shard if sp else Replicate()),
        }
        moe = isinstance(block.mlp, MoEMLP)
        if moe:
            if not sp:
                raise ValueError("mixture-of-experts layers under tensor parallelism need sequence parallelism")
            block.mlp.shard_for_tensor_parallel(tp_mesh)
        elif block.mlp.swiglu:
            plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                         "mlp.down_proj": RowwiseParallel(output_layouts=seq_shard if sp else Replicate())})
        else:
            plan.update({"mlp.fc1": ColwiseParallel(),
                         "mlp.fc2": RowwiseParallel(output_layouts=seq_shard if sp else Replicate())})
        if sp:
            # the norms run on sequence shards; attention and MLP gather the sequence once each
            plan.update({
                "norm1": SequenceParallel(), "norm2": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(seq_shard,), desired_input_layouts=(Replicate(),)),
                "mlp": PrepareModuleInput(input_layouts=(seq_shard,),
                                          desired_input_layouts=(seq_shard if moe else Replicate(),),
                                          use_local_output=moe),
            })
        else:
            # attention's and the MLP's input enter as one replicated DTensor each, so that q, k, v (gate, up)
            # share it and its gradient is all-reduced once in the backward (Megatron's `f`), not once per
            # projection as each ColwiseParallel would on a plain tensor
            plan.update({name: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
                         for name in ("attn", "mlp")})
        parallelize_module(block, tp_mesh, plan)
    if chunk.embed is not None:
        if sp and chunk.embed.pos is None:
            # nothing to add to whole rows: the partial lookups are reduce-scattered onto the sequence shards
            plan = {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_shard)}
        else:
            plan = {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
            if sp:
                # learned positions are added to the all-reduced rows, which are split before the dropout
                # (as Megatron-Core does when it has position embeddings)
                plan["drop"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(seq_shard,),
                                                  use_local_output=True)
        parallelize_module(chunk.embed, tp_mesh, plan)
    if chunk.head is not None:
        plan = {"proj": ColwiseParallel(input_layouts=seq_shard if sp else Replicate(),
                                        output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)}
        if sp:
            plan["norm"] = SequenceParallel()
        parallelize_module(chunk.head, tp_mesh, plan)
    chunk.tie_weights()


# ----------------------------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------------------------
def apply_data_parallel(chunk: ModelChunk, dp_mesh: DeviceMesh, zero: int, mp_policy=None,
                        expert_mesh: DeviceMesh | None = None) -> None:
    """ZeRO 1-3 with FSDP2 (`fully_shard` per block, then the chunk for the embedding and head);
    ZeRO-3 reshards each block's parameters after its forward, ZeRO 1-2 keep them until backward.
    ZeRO 0 with FSDP2's `replicate` (DDP semantics; plain `DDP(process_group=...)` rejects TP's DTensor
    parameters). Gradients are averaged over the data-parallel group.

    Under expert parallelism (`expert_mesh`: the mesh's 'edp' dimension) the routed experts of each
    MoE layer are wrapped first, on their own, the same way over the expert-data-parallel group, and their
    gradients scaled by 1/ep in backward (GroupedExperts.grad_scale), so that they too come out as the mean over
    all data-parallel ranks; the block's wrapper then leaves them alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    if expert_mesh is not None:
        _wrap_experts(chunk, dp_mesh.size() // expert_mesh.size(), expert_mesh, zero, policy)
    if zero == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        for block in chunk.layers.values():
            replicate(block, mesh=dp_mesh, mp_policy=policy)
        replicate(chunk, mesh=dp_mesh, mp_policy=policy)
        return
    for block in chunk.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=(zero == 3), mp_policy=policy)
    fully_shard(chunk, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)


def _wrap_experts(chunk: ModelChunk, ep: int, edp_mesh: DeviceMesh, zero: int, policy) -> None:
    """Data parallelism over the expert-data-parallel mesh for the routed experts of every MoE layer of `chunk`."""
    from torch.distributed.fsdp import fully_shard

    from runtime.moe import MoEMLP
    for block in chunk.layers.values():
        if not isinstance(block.mlp, MoEMLP):
            continue
        experts = block.mlp.experts
        experts.grad_scale = 1.0 / ep
        if zero == 0:
            from torch.distributed._composable.replicate_with_fsdp import replicate
            replicate(experts, mesh=edp_mesh, mp_policy=policy)
        else:
            fully_shard(experts, mesh=edp_mesh, reshard_after_forward=(zero == 3), mp_policy=policy)


def reduce_partial_grads(params: list[nn.Parameter]) -> int:
    """Sum, in one all-reduce per device-mesh dimension, the gradients tensor parallelism leaves as partial
    sums over its ranks (sequence parallelism's norm weights, each rank's share from its sequence shard), and
    hand them on replicated. Left partial, every foreach op of the optimizer that reads one reduces it again (three
    all-reduces per tensor for AdamW); Megatron-LM reduces them in one flat buffer likewise
    (`_allreduce_layernorm_grads`). Returns the all-reduces issued."""
    from torch.distributed.tensor import DTensor, Replicate

    pending: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_partial())
            if dims:
                pending.setdefault((g.device_mesh, g.placements, dims, g.dtype), []).append(p)
    calls = 0
    for (mesh, placements, dims, _), group in pending.items():
        local = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in local])
        for d in dims:
            op = dist.ReduceOp.AVG if placements[d].reduce_op == "avg" else dist.ReduceOp.SUM
            dist.all_reduce(flat, op=op, group=mesh.get_group(d))
            calls += 1
        done = tuple(Replicate() if i in dims else pl for i, pl in enumerate(placements))
        for p, t, piece in zip(group, local, flat.split([t.numel() for t in local])):
            p.grad = DTensor.from_local(piece.view_as(t), mesh, done, run_check=False, shape=p.grad.shape,
                                        stride=p.grad.stride())
    return calls


def set_gradient_sync(chunk: nn.Module, enabled: bool) -> None:
    """Reduce gradients over the data-parallel group in the coming backward (FSDP2 / replicate modules);
    a no-op without data parallelism."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(chunk, FSDPModule):
        chunk.set_requires_gradient_sync(enabled)


# ----------------------------------------------------------------------------------------------
# One rank's chunks
# ----------------------------------------------------------------------------------------------
def chunk_layer_ids(layers_per_stage: list[int]) -> list[list[int]]:
    """Global block indices of each model chunk, in pipeline order."""
    out, start = [], 0
    for n in layers_per_stage:
        out.append(list(range(start, start + n)))
        start += n
    return out


def local_chunk_indices(pp: int, vpp: int, pp_rank: int) -> list[int]:
    """Chunks (pipeline stages) held by pipeline rank `pp_rank`: chunk j lives on rank j % pp."""
    return [j for j in range(pp * vpp) if j % pp == pp_rank]


def build_chunks(plan: Plan, mesh: DeviceMesh, coords: Coords, device: torch.device, seed: int,
                 mp_policy=None, loss_parallel: bool = True,
                 compile_blocks: bool = False) -> tuple[list[int], list[ModelChunk]]:
    """This rank's model chunks, parallelised as the plan says and initialised from `seed`. With
    `compile_blocks` each transformer block is compiled (torch.compile, in place) after tensor parallelism and
    before data parallelism, torchtitan's order, so FSDP2's hooks stay outside the compiled graph.

    Returns (stage indices, chunks). Parameters are created on the meta device, sharded, then materialised
    on `device`, so no rank ever holds more than its shard of a layer plus one full parameter at a time.
    """
    cfg, spec = plan.config, plan.model
    ids = chunk_layer_ids(list(cfg.layers_per_stage))
    stages = local_chunk_indices(cfg.pp, cfg.vpp, coords.pp)
    nchunks = cfg.pp * cfg.vpp
    ep_group = mesh["ep"].get_group() if cfg.ep > 1 else None
    chunks = []
    for j in stages:
        with torch.device("meta"):
            chunk = ModelChunk(spec, ids[j], first=(j == 0), last=(j == nchunks - 1), recompute=cfg.recompute,
                               vocab_tp=cfg.tp, ep_group=ep_group)
        if cfg.tp > 1:
            apply_tensor_parallel(chunk, mesh["tp"], cfg.sp, loss_parallel)
        if compile_blocks:
            for block in chunk.layers.values():
                block.compile()
        if cfg.dp > 1:
            apply_data_parallel(chunk, mesh["dp"], cfg.zero, mp_policy, mesh["edp"] if cfg.ep > 1 else None)
        chunk.to_empty(device=device)
        # `to_empty` gives each module a new Parameter for a plain (non-DTensor) tensor, which unties a
        # head that shared the embedding's weight: tie it again, then check that the tie held
        chunk.tie_weights()
        _check_tied(chunk)
        for block in chunk.layers.values():
            block.attn.reset_buffers(device)
        init_weights(chunk, seed)
        chunks.append(chunk)
    return stages, chunks


def _check_tied(chunk: ModelChunk) -> None:
    """A chunk holding both ends of a tied model must hold one shared matrix, not two copies."""
    if chunk.spec.tied_embeddings and chunk.embed is not None and chunk.head is not None:
        if chunk.head.proj.weight is not chunk.embed.tok.weight:
            raise RuntimeError("the LM head lost its tie to the token embedding while being parallelised")


class RankModel(nn.Module):
    """All the parameters one rank holds, named as in the whole model ('embed.tok.weight',
    'layers.7.attn.q_proj.weight', 'head.norm.weight'): the root for its optimizer and checkpoints."""

    def __init__(self, chunks: list[ModelChunk]):
        super().__init__()
        self.embed = next((c.embed for c in chunks if c.embed is not None), None)
        self.layers = nn.ModuleDict({k: v for c in chunks for k, v in c.layers.items()})
        self.head = next((c.head for c in chunks if c.head is not None), None)


# ----------------------------------------------------------------------------------------------
# Tied embeddings across pipeline stages
# ----------------------------------------------------------------------------------------------
class TiedEmbeddingSync:
    """With tied embeddings and pp > 1 the first stage's token embedding and the last stage's head
    projection are two copies of one matrix (initialised equal): after each backward their gradients
    are summed between the two ranks of each (dp, tp) coordinate (Megatron-LM's embedding group), so the
    copies stay equal."""

    def __init__(self, plan: Plan, coords: Coords, model: RankModel):
        cfg, dims = plan.config, plan.config.dims
        self.param = None
        self.group = None
        if not (plan.model.tied_embeddings and cfg.pp > 1):
            return
        devices, mine = rank_devices(plan), dims.rank(**asdict(coords))
        for pair in tied_embedding_pairs(dims):
            group = dist.new_group([devices[r] for r in pair])   # every rank creates every group, in order
            if mine in pair:
                self.group = group
        if coords.pp == 0:
            self.param = model.embed.tok.weight
        elif coords.pp == cfg.pp - 1:
            self.param = model.head.proj.weight

    def __call__(self) -> None:
        if self.group is None or self.param is None:
            return
        from torch.distributed.tensor import DTensor
        grad = self.param.grad
        if isinstance(grad, DTensor) and grad.placements != self.param.placements:
            # without a data-parallel wrapper the vocabulary-sharded embedding's backward leaves a replicated
            # gradient: shard it as the weight (a local slice), so both ends reduce the same rows
            grad = self.param.grad = grad.redistribute(grad.device_mesh, self.param.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, group=self.group)
