"""FSDP2's host hooks around each wrapped block (engine.host.fsdp_hooks): which hooks FSDP2 runs per block, pass
and micro-batch (counted with torch.profiler on the runtime's own block, one gloo rank), how many parameter
tensors they walk (the runtime's block), and that they cost the pass time only where the host sets its pace."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from planner.cost.comm import Group
from planner.cost.model import CostModel, StateTraffic
from planner.cost.params import EXPERT_UNIT_TENSORS, tensors_per_block
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from tests.gloo_helpers import single_gloo_rank

SMALL = ModelSpec(name="g", num_layers=2, hidden_size=64, num_heads=4, vocab_size=1000,
                  max_position_embeddings=32, dropout=0.0)


@pytest.fixture(scope="module")
def one_rank():
    with single_gloo_rank():
        yield


def _cost(model: ModelSpec = SMALL, engine: str = "meshplan", cluster: str = "dgx-h100") -> CostModel:
    return CostModel(model, load_cluster(cluster), TrainingSpec(global_batch=8, seq_len=16, precision="bf16"),
                     engine=load_engine(engine))


def test_fsdp2_runs_one_set_of_hooks_per_block_pass_and_micro_batch(one_rank):
    """Two wrapped blocks, two micro-batches: every block's pre/post-forward and pre/post-backward hooks run once
    per micro-batch; what the engine file prices per block and pass."""
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import profile

    from runtime.models import TransformerBlock
    blocks = torch.nn.Sequential(TransformerBlock(SMALL), TransformerBlock(SMALL))
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(blocks)
    x = torch.randn(2, 16, 64)
    blocks(x).sum().backward()                      # lazy initialisation outside the count
    with profile() as prof:
        for _ in range(2):
            blocks(x).sum().backward()
    seen = Counter(e.name for e in prof.events() if e.name.startswith("FSDP::"))
    for i in (0, 1):
        for hook in ("pre_forward", "post_forward", "pre_backward", "post_backward_reduce"):
            assert seen[f"FSDP::{hook} ({i})"] == 2, (hook, i, seen)


def test_the_hooks_walk_the_runtimes_parameter_tensors():
    from runtime.models import TransformerBlock
    tensors = len(list(TransformerBlock(SMALL).parameters()))
    hooks = load_engine("meshplan").host.fsdp_hooks.resharded
    forward, backward = _cost().hook_seconds(ParallelConfig(dp=8, mbs=1, zero=3))
    assert forward == pytest.approx(hooks.forward_s + hooks.per_tensor_forward_s * tensors, rel=1e-12)
    assert backward == pytest.approx(hooks.backward_s + hooks.per_tensor_backward_s * tensors, rel=1e-12)


@pytest.mark.parametrize("engine, cfg, wrapper", [
    ("meshplan", ParallelConfig(dp=8, mbs=1, zero=3), "resharded"),
    ("meshplan", ParallelConfig(dp=8, mbs=1, zero=2), "kept"),
    ("meshplan", ParallelConfig(dp=8, mbs=1, zero=1), "kept"),
    ("meshplan", ParallelConfig(dp=8, mbs=1, zero=0), "replicated"),   # runtime: replicate_with_fsdp
    ("torchtitan", ParallelConfig(dp=8, mbs=1, zero=0), None),          # DDP's C++ reducer
    ("meshplan", ParallelConfig(tp=8, dp=1, mbs=1, zero=3), None),      # nothing wrapped without dp
    ("megatron", ParallelConfig(dp=8, mbs=1, zero=1), None),
])
def test_which_hooks_run(engine, cfg, wrapper):
    hooks = load_engine(engine).host.fsdp_hooks
    got = _cost(engine=engine).hook_seconds(cfg)
    if wrapper is None:
        assert got == (0.0, 0.0)
    else:
        assert got == getattr(hooks, wrapper).seconds(16)       # SMALL's block: 16 parameter tensors


def test_hooks_cost_the_pass_only_where_the_host_sets_its_pace():
    """On an asynchronous GPU a pass takes the longer of its device and host time: the hooks' seconds all show on
    a launch-bound block (a tiny one) and none on a block whose device time exceeds its host time by more."""
    hooks = StateTraffic(hooks_forward_s=300e-6, hooks_backward_s=500e-6)
    tiny = _cost()
    tp_group, dt = Group((0,), 8), tiny.dtypes(3, 8)
    plain = tiny.block(1, 1, False, "none", tp_group, dt)
    hooked = tiny.block(1, 1, False, "none", tp_group, dt, traffic=hooks)
    assert hooked.forward.compute - plain.forward.compute == pytest.approx(300e-6, rel=1e-9)
    assert hooked.backward.compute - plain.backward.compute == pytest.approx(500e-6, rel=1e-9)
    big = _cost(ModelSpec(name="b", num_layers=2, hidden_size=8192, num_heads=64, vocab_size=1000,
                          max_position_embeddings=4096, dropout=0.0))
    wide = CostModel(big.model, big.cluster, TrainingSpec(global_batch=8, seq_len=4096, precision="bf16"),
                     engine=load_engine("meshplan"))
    plain = wide.block(1, 4, False, "none", tp_group, dt)
    hooked = wide.block(1, 4, False, "none", tp_group, dt, traffic=hooks)
    assert hooked.forward.compute == plain.forward.compute
    assert hooked.backward.compute == plain.backward.compute


def _end_tensors(model: ModelSpec, first: bool, last: bool) -> int:
    """Parameter tensors a runtime chunk holds outside its blocks (what its own FSDP2 unit walks)."""
    from runtime.models import ModelChunk
    chunk = ModelChunk(model, [0], first=first, last=last)
    in_blocks = {id(p) for p in chunk.layers.parameters()}
    return sum(1 for p in chunk.parameters() if id(p) not in in_blocks)


@pytest.mark.parametrize("model", [SMALL, SMALL.model_copy(update={"tied_embeddings": False})])
def test_the_root_units_hooks_walk_each_stages_own_tensors(model):
    """The unit that wraps a chunk (runtime/parallelize.py: kept gathered) walks the chunk's own tensors: the
    embedding's, the final norm's and the head's (counted on the runtime's chunks), priced once per micro-batch
    with the embedding without pipelining, and on each end's stage with it."""
    kept = load_engine("meshplan").host.fsdp_hooks.kept
    cost = _cost(model)
    whole = cost.root_hook_seconds(ParallelConfig(dp=8, mbs=1, zero=3))
    assert whole == (*kept.seconds(_end_tensors(model, True, True)), 0.0, 0.0)
    piped = cost.root_hook_seconds(ParallelConfig(pp=2, dp=4, mbs=1, zero=3))
    assert piped == (*kept.seconds(_end_tensors(model, True, False)), *kept.seconds(_end_tensors(model, False, True)))
    assert cost.root_hook_seconds(ParallelConfig(tp=8, mbs=1, zero=3)) == (0.0, 0.0, 0.0, 0.0)


def test_the_root_unit_runs_its_hooks_once_per_micro_batch(one_rank):
    """The chunk's own unit, around two wrapped blocks: its forward and backward hooks run once per micro-batch,
    as each block's do (what root_hook_seconds prices)."""
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import profile

    from runtime.models import ModelChunk
    chunk = ModelChunk(SMALL, [0, 1], first=True, last=True)
    for block in chunk.layers.values():
        fully_shard(block, reshard_after_forward=True)
    fully_shard(chunk, reshard_after_forward=False)
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    chunk(x).float().sum().backward()               # lazy initialisation outside the count
    with profile() as prof:
        for _ in range(2):
            chunk(x).float().sum().backward()
    seen = Counter(e.name for e in prof.events() if e.name.startswith("FSDP::"))
    for hook in ("pre_forward", "post_forward", "pre_backward", "post_backward_reduce"):
        assert seen[f"FSDP::{hook}"] == 2, (hook, seen)                 # the chunk's own unit
        assert seen[f"FSDP::{hook} (layers.0)"] == seen[f"FSDP::{hook} (layers.1)"] == 2, (hook, seen)


MOE = ModelSpec(**{**PRESETS["moe-tiny"].model_dump(), "name": "m"})


def test_an_moe_blocks_hooks_walk_its_router_experts_and_shared_expert():
    """An MoE block of the runtime (moe-tiny's layer 1: router, stacked routed experts, a shared expert) has as many
    parameter tensors as the block the hooks price; under expert parallelism the routed experts are wrapped apart
    (runtime/parallelize.py), so the block's unit walks the rest and the experts' unit their own three."""
    from runtime.models import TransformerBlock
    block = TransformerBlock(MOE, layer_id=1)
    experts = {id(p) for p in block.mlp.experts.parameters()}
    assert tensors_per_block(MOE, False, moe_layer=True) == len(list(block.parameters()))
    assert tensors_per_block(MOE, False, moe_layer=True, experts_apart=True) == sum(
        1 for p in block.parameters() if id(p) not in experts)
    assert EXPERT_UNIT_TENSORS == len(experts)
    dense = TransformerBlock(MOE, layer_id=0)
    assert tensors_per_block(MOE, False) == len(list(dense.parameters()))


@pytest.mark.parametrize("cfg, apart", [(ParallelConfig(dp=8, ep=2, mbs=1, zero=3), True),
                                        (ParallelConfig(dp=8, ep=1, mbs=1, zero=3), False)])
def test_moe_blocks_price_the_expert_unit_under_expert_parallelism(cfg, apart):
    hooks = load_engine("meshplan").host.fsdp_hooks.resharded
    cost = _cost(MOE)
    got = cost.hook_seconds(cfg, moe_layer=True)
    if apart:
        block, experts = hooks.seconds(tensors_per_block(MOE, False, True, True)), hooks.seconds(EXPERT_UNIT_TENSORS)
        assert got == pytest.approx((block[0] + experts[0], block[1] + experts[1]), rel=1e-12)
    else:
        assert got == pytest.approx(hooks.seconds(tensors_per_block(MOE, False, True)), rel=1e-12)
    assert cost.state_traffic(cfg, 2).moe_hooks_s == got
    assert cost.hook_seconds(cfg) == hooks.seconds(tensors_per_block(MOE, False))     # the dense layer 0


def test_the_runtimes_expert_unit_runs_its_own_hooks(one_rank):
    """runtime/parallelize.py under expert parallelism: the routed experts of each MoE block run a set of FSDP2
    hooks of their own per pass, besides their block's (one rank: a mesh of one for dp and edp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import profile

    from runtime.models import ModelChunk
    from runtime.parallelize import apply_data_parallel
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "edp"))
    chunk = ModelChunk(MOE, [0, 1], first=True, last=True)
    apply_data_parallel(chunk, mesh["dp"], 3, expert_mesh=mesh["edp"])
    x = torch.randint(0, MOE.vocab_size, (2, 16))
    chunk(x).float().sum().backward()               # lazy initialisation outside the count
    with profile() as prof:
        chunk(x).float().sum().backward()
    seen = Counter(e.name for e in prof.events() if e.name.startswith("FSDP::"))
    for hook in ("pre_forward", "post_forward", "pre_backward", "post_backward_reduce"):
        assert seen[f"FSDP::{hook} (layers.1.mlp.experts)"] == 1, (hook, seen)
        assert seen[f"FSDP::{hook} (layers.1)"] == seen[f"FSDP::{hook} (layers.0)"] == 1, (hook, seen)
        assert not any("layers.0.mlp" in name for name in seen), seen                # the dense layer 0
