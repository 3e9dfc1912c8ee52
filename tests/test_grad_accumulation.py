"""Gradient accumulation over micro-batches (engine.kernels.grad_accumulation): what each later micro-batch's
backward adds, checked against the adds PyTorch's autograd really issues on CPU (torch.profiler), against the
bytes of the published recipes (Megatron-LM's main_grad hook, AccumulateGrad in 16 bits, FSDP2's fp32
accumulator), and the cases where nothing is added."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from planner.cost.comm import Group
from planner.cost.model import CostModel, StateTraffic
from planner.cost.params import layer_params, tensors_per_block
from planner.engine import EngineSpec, load_engine
from planner.loaders import load_cluster
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from runtime.models import TransformerBlock

SMALL = ModelSpec(name="g", num_layers=2, hidden_size=64, num_heads=4, vocab_size=1000,
                  max_position_embeddings=32, dropout=0.0)


def accumulate_adds(block: torch.nn.Module, x: torch.Tensor) -> list:
    """The in-place adds (profiler events, with input shapes) autograd's AccumulateGrad nodes issue in one
    backward."""
    with profile(record_shapes=True) as prof:
        block(x).sum().backward()
    return [c for ev in prof.events() if ev.name == "torch::autograd::AccumulateGrad"
            for c in ev.cpu_children if c.name == "aten::add_"]


def with_mode(engine: str, mode: str) -> EngineSpec:
    spec = load_engine(engine)
    return spec.model_copy(update={"kernels": spec.kernels.model_copy(update={"grad_accumulation": mode})})


@pytest.mark.parametrize("tp", [1, 2])
def test_later_microbatches_add_each_parameter_once(tp):
    """The first backward stores the gradients (no add); every later one adds each parameter tensor once: as
    many adds as `tensors_per_block` counts, over the elements `layer_params` gives one TP rank."""
    block = TransformerBlock(SMALL, tp_degree=tp)
    x = torch.randn(2, 16, 64)
    assert accumulate_adds(block, x) == []
    adds = accumulate_adds(block, x)
    params = list(block.parameters())
    assert len(adds) == len(params) == tensors_per_block(SMALL, fused_projections=False)
    numel = sum(torch.Size(a.input_shapes[0]).numel() for a in adds)
    assert numel == sum(p.numel() for p in params) == layer_params(SMALL).per_tp_rank(tp)


def _cost(engine: str | EngineSpec, precision: str) -> CostModel:
    model = ModelSpec(name="g", num_layers=8, hidden_size=4096, num_heads=32, vocab_size=51200,
                               max_position_embeddings=2048, dropout=0.0)
    return CostModel(model, load_cluster("dgx-a100-80gb"), TrainingSpec(global_batch=32, seq_len=2048,
                     precision=precision), engine=load_engine(engine) if isinstance(engine, str) else engine)


def test_bytes_per_element_follow_each_recipe():
    """Hand-derived from each engine's code: AccumulateGrad on fp16 gradients reads the new one and reads and
    writes the old (2 + 2 + 2 bytes) on all but the first micro-batch; Megatron-LM's 2021 hook
    main_grad.add_(grad) reads 2 bytes of bf16 and reads and writes 4 of fp32 on every micro-batch; FSDP2,
    its reduction deferred under a pipeline, adds the bf16 gradient into its fp32 accumulator (2 + 4 + 4)."""
    ds = _cost("deepspeed", "fp16")
    assert ds.accumulation_bytes(ParallelConfig(tp=8, dp=1, mbs=8), 4) == pytest.approx(6 * 3 / 4)
    hook = _cost(with_mode("megatron", "hook"), "bf16")
    assert hook.accumulation_bytes(ParallelConfig(tp=8, dp=1, mbs=8), 4) == 10
    assert hook.accumulation_bytes(ParallelConfig(tp=8, dp=1, mbs=32), 1) == 10
    fsdp = _cost("meshplan", "bf16")
    assert fsdp.accumulation_bytes(ParallelConfig(tp=1, pp=2, dp=4, mbs=1, zero=3), 8) == pytest.approx(10 * 7 / 8)


@pytest.mark.parametrize("engine, cfg, nmb", [
    ("megatron", ParallelConfig(tp=8, dp=1, mbs=1), 32),              # fused into the dW GEMM
    ("deepspeed", ParallelConfig(tp=8, dp=1, mbs=32), 1),             # one micro-batch: nothing to add to
    ("deepspeed", ParallelConfig(tp=1, dp=8, mbs=1, zero=2), 4),      # reduce-scattered every micro-batch
    ("meshplan", ParallelConfig(tp=1, dp=8, mbs=1, zero=3), 4),       # FSDP2 syncing each micro-batch
])
def test_nothing_is_added(engine, cfg, nmb):
    assert _cost(engine, "bf16" if engine != "deepspeed" else "fp16").accumulation_bytes(cfg, nmb) == 0


def test_each_later_backward_pays_the_traffic_of_its_adds():
    """A large block's backward (device-bound) grows by the accumulation's bytes over the GPU's elementwise
    bandwidth; the step of a one-stage run by that times the micro-batches and blocks."""
    cost = _cost("deepspeed", "fp16")
    cfg = ParallelConfig(tp=8, dp=1, mbs=8, recompute="full")
    nmb = cfg.microbatches(32)
    acc = cost.accumulation_bytes(cfg, nmb)
    tp_group, dt = Group(tuple(range(8)), 8), cost.dtypes(0, 1)
    plain = cost.block(8, 8, False, "full", tp_group, dt)
    summed = cost.block(8, 8, False, "full", tp_group, dt, traffic=StateTraffic(accumulate=acc))
    gpu = cost.gpu
    moved = layer_params(cost.model).per_tp_rank(8) * acc / (gpu.hbm_bandwidth * gpu.efficiency.memory)
    assert summed.backward.compute - plain.backward.compute == pytest.approx(moved, rel=1e-9)
    assert summed.forward == plain.forward and summed.recompute == plain.recompute

    fused = _cost(with_mode("deepspeed", "fused"), "fp16")
    step = cost.evaluate(cfg, validate=False).predicted.step_time_s
    step_fused = fused.evaluate(cfg, validate=False).predicted.step_time_s
    assert step - step_fused == pytest.approx(nmb * cost.model.num_layers * moved, rel=1e-6)
