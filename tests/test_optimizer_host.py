"""The optimizer step's host cost per parameter tensor (engine.host.optimizer_per_tensor_s / _per_dtensor_s):
the cost model's count of plain and DTensor parameters against the runtime's own chunks after
runtime/parallelize.py has sharded them, what the step adds on a CPU (host and arithmetic add up) and on a GPU
(the larger of the two), and profiler/host.py's measurement of both figures on this host."""

from __future__ import annotations

import pytest
import torch

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec
from tests.gloo_helpers import single_gloo_rank


@pytest.fixture(scope="module")
def one_rank():
    with single_gloo_rank():
        yield


def _runtime_tensors(name: str, layers: list[int], first: bool, last: bool, tp: bool, sp: bool,
                     zero: int | None) -> tuple[int, int]:
    """(plain, DTensor) parameters of the runtime's chunk, sharded as runtime/parallelize.py does (meshes of one:
    the placements, not the degree, make a parameter a DTensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from runtime.models import ModelChunk
    from runtime.parallelize import apply_data_parallel, apply_tensor_parallel
    with torch.device("meta"):
        chunk = ModelChunk(PRESETS[name], layers, first=first, last=last)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    if tp:
        apply_tensor_parallel(chunk, mesh["tp"], sp, loss_parallel=False)
    if zero is not None:
        apply_data_parallel(chunk, mesh["dp"], zero)
    params = list(chunk.parameters())
    dtensors = sum(isinstance(p, DTensor) for p in params)
    return len(params) - dtensors, dtensors


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("tp, sp, dp, zero, pp", [
    (1, False, 1, 0, 1), (1, False, 1, 0, 2), (2, False, 1, 0, 1), (2, True, 1, 0, 2), (1, False, 2, 0, 1),
    (1, False, 2, 3, 2), (2, False, 2, 1, 1)])
def test_plain_and_dtensor_parameters_as_the_runtime_holds_them(one_rank, name, tp, sp, dp, zero, pp):
    spec = PRESETS[name]
    cost = CostModel(spec, load_cluster("cpu-local"), TrainingSpec(global_batch=8, seq_len=32),
                     engine=load_engine("meshplan"))
    cfg = ParallelConfig(tp=tp, sp=sp, dp=dp, zero=zero, pp=pp, mbs=1)
    per_stage = spec.num_layers // pp
    for device in range(pp):
        ids = list(range(device * per_stage, (device + 1) * per_stage))
        want = _runtime_tensors(name, ids, device == 0, device == pp - 1, tp > 1, sp, zero if dp > 1 else None)
        assert cost.optimizer_tensors(cfg, per_stage, device=device) == pytest.approx(want), (device, want)


def _with_optimizer_host(engine_name: str, per_tensor: float, per_dtensor: float):
    engine = load_engine(engine_name)
    return engine.model_copy(update={"host": engine.host.model_copy(
        update={"optimizer_per_tensor_s": per_tensor, "optimizer_per_dtensor_s": per_dtensor})})


@pytest.mark.parametrize("cfg", [ParallelConfig(dp=2, zero=3, mbs=1), ParallelConfig(pp=2, mbs=1),
                                 ParallelConfig(tp=2, mbs=1)])
def test_on_a_cpu_the_step_pays_each_tensor(cfg):
    """A CPU runs the ops it issues: the step grows by the tensors of the stage that steps last times their
    cost."""
    spec, training = PRESETS["llama-tiny"], TrainingSpec(global_batch=8, seq_len=32)
    steps = {}
    for per_tensor, per_dtensor in ((0.0, 0.0), (1e-3, 5e-3)):
        cost = CostModel(spec, load_cluster("cpu-local"), training,
                         engine=_with_optimizer_host("meshplan", per_tensor, per_dtensor))
        steps[per_tensor] = cost.evaluate_core(cfg).step
    # llama-tiny: 4 blocks of 9 tensors (2 norms, q, k, v, o, gate, up, down), embedding 1, head norm + proj 2
    tensors = {(2, 1, 1): (0, 39), (1, 2, 1): (20, 0), (1, 1, 2): (9, 30)}[(cfg.dp, cfg.pp, cfg.tp)]
    if cfg.pp == 2:   # 1F1B ends on stage 0 (the last backward): its 2 blocks and the embedding
        tensors = (2 * 9 + 1, 0)
    assert steps[1e-3] - steps[0.0] == pytest.approx(tensors[0] * 1e-3 + tensors[1] * 5e-3, rel=1e-6)


def test_on_a_gpu_the_host_hides_behind_the_arithmetic_until_it_is_the_longer():
    spec, training = PRESETS["llama3-8b"], TrainingSpec(global_batch=8, seq_len=2048)
    cfg = ParallelConfig(dp=8, zero=3, mbs=1)
    cluster = load_cluster("dgx-h100")
    base = CostModel(spec, cluster, training, engine=_with_optimizer_host("meshplan", 0.0, 0.0))
    arithmetic = base.optimizer_seconds(cfg, base.device_params(cfg, 0, 32), 32, device=0)
    tensors = base.optimizer_tensors(cfg, 32, device=0)[1]        # FSDP2: every tensor a DTensor
    for per_dtensor, want in ((0.5 * arithmetic / tensors, arithmetic), (2 * arithmetic / tensors, 2 * arithmetic)):
        cost = CostModel(spec, cluster, training, engine=_with_optimizer_host("meshplan", 0.0, per_dtensor))
        assert cost.optimizer_seconds(cfg, cost.device_params(cfg, 0, 32), 32, device=0) == pytest.approx(want)


def test_profile_measures_dtensor_parameters_dearer_than_plain_ones(one_rank):
    """DTensor's dispatch runs around every op of the per-tensor loop: several times the plain tensor's cost."""
    from profiler.host import measure_optimizer_host
    got = measure_optimizer_host(torch.device("cpu"))
    assert 0 < got["optimizer_per_tensor_s"] < 1e-3
    assert got["optimizer_per_dtensor_s"] > 2 * got["optimizer_per_tensor_s"]


def test_without_a_process_group_only_the_plain_figure_is_measured(monkeypatch):
    import torch.distributed as dist

    from profiler.host import measure_optimizer_host
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert set(measure_optimizer_host(torch.device("cpu"))) == {"optimizer_per_tensor_s"}
