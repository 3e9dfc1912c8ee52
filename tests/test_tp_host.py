"""DTensor tensor parallelism's host seconds per block (engine.host.tp_dtensor): how many projections run as
DTensor ops in the runtime's own blocks (counted after runtime/parallelize.py shards them), and that their seconds
are added to each pass's host time (all of it on a CPU, which runs its ops itself), to full recomputation's
forward again, and not at tp 1 or for Megatron's plain autograd TP."""

from __future__ import annotations

import pytest
import torch

from planner.cost.comm import Group
from planner.cost.model import CostModel
from planner.cost.params import sharded_projections
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.specs import TrainingSpec
from tests.gloo_helpers import single_gloo_rank


@pytest.fixture(scope="module")
def one_rank():
    with single_gloo_rank():
        yield


@pytest.mark.parametrize("name, layer, sp", [("gpt-tiny", 0, False), ("llama-tiny", 0, True),
                                             ("moe-tiny", 0, True), ("moe-tiny", 1, True)])
def test_the_runtimes_sharded_projections(one_rank, name, layer, sp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from runtime.models import ModelChunk
    from runtime.parallelize import apply_tensor_parallel
    spec = PRESETS[name]
    with torch.device("meta"):
        chunk = ModelChunk(spec, [layer], first=False, last=False)
    apply_tensor_parallel(chunk, init_device_mesh("cpu", (1,)), sp, loss_parallel=False)
    sharded = [m for m in chunk.modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, DTensor)
               and any(p.is_shard() for p in m.weight.placements)]
    moe = spec.moe is not None and spec.moe.is_moe_layer(layer)
    assert len(sharded) == sharded_projections(spec, fused_projections=False, moe_layer=moe)


def _costs(engine_name: str, cluster: str = "cpu-local"):
    engine = load_engine(engine_name)
    bare = engine.model_copy(update={"host": engine.host.model_copy(update={"tp_dtensor": None})})
    spec, training = PRESETS["gpt-tiny"], TrainingSpec(global_batch=8, seq_len=64)
    return (CostModel(spec, load_cluster(cluster), training, engine=engine),
            CostModel(spec, load_cluster(cluster), training, engine=bare), engine)


@pytest.mark.parametrize("sp, recompute", [(False, "none"), (True, "none"), (False, "full")])
def test_each_pass_pays_its_projections_dtensor_seconds(sp, recompute):
    cost, bare, engine = _costs("meshplan")
    tp_group, dt = Group((0, 1), 8), cost.dtypes(0, 1)
    got, without = (c.block(2, 1, sp, recompute, tp_group, dt) for c in (cost, bare))
    t = engine.host.tp_dtensor
    n = sharded_projections(cost.model, False)        # gpt-tiny: q, k, v, o, fc1, fc2
    assert n == 6
    forward = t.per_projection_forward_s * n + (t.sp_forward_s if sp else 0.0)
    backward = t.per_projection_backward_s * n + (t.sp_backward_s if sp else 0.0)
    assert got.forward.compute - without.forward.compute == pytest.approx(forward, rel=1e-9)
    assert got.backward.compute - without.backward.compute == pytest.approx(backward, rel=1e-9)
    rerun = forward if recompute == "full" else 0.0
    assert got.recompute.compute - without.recompute.compute == pytest.approx(rerun, rel=1e-9, abs=1e-15)


def test_no_dtensor_seconds_at_tp_1_or_for_megatron():
    cost, bare, _ = _costs("meshplan")
    dt = cost.dtypes(0, 1)
    assert cost.block(1, 1, False, "none", Group((0,), 8), dt) == bare.block(1, 1, False, "none", Group((0,), 8), dt)
    assert load_engine("megatron").host.tp_dtensor is None
