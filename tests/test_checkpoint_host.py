"""What activation checkpointing costs the host (engine.host.recompute_kernel_factor, checkpoint_forward_s): the
replay before each block's backward is priced at the factor times a forward kernel's host seconds per replayed
kernel, entering the checkpointed region adds its seconds to the forward, and neither applies without
recomputation or to engines that carry no such figures; `profiler.host.fit_checkpoint` recovers both from block
times synthesised with known values."""

from __future__ import annotations

import pytest

from planner.cost.comm import Group
from planner.cost.kernels import block_work
from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.presets import PRESETS
from planner.specs import TrainingSpec
from profiler.host import fit_checkpoint


def _costs(factor: float, entry: float, engine: str = "meshplan"):
    e = load_engine(engine)
    e = e.model_copy(update={"host": e.host.model_copy(update={"recompute_kernel_factor": factor,
                                                                "checkpoint_forward_s": entry})})
    return CostModel(PRESETS["gpt-tiny"], load_cluster("cpu-local"), TrainingSpec(global_batch=8, seq_len=64),
                     engine=e)


def test_the_replay_and_the_region_entry_cost_the_host_what_the_engine_says():
    cost, plain = _costs(3.0, 150e-6), _costs(1.0, 0.0)
    dt, group = cost.dtypes(0, 1), Group((0,), 8)
    got, base = (c.block(1, 2, False, "full", group, dt) for c in (cost, plain))
    replayed = len(block_work(cost.model, 2, 64, 1, False, "full", dt, cost.opts).recompute.kernels)
    # a CPU runs its own ops: host and device seconds add, so the differences are the host's alone
    assert got.recompute.compute - base.recompute.compute == pytest.approx(2.0 * replayed * cost.host_fwd, rel=1e-9)
    assert got.forward.compute - base.forward.compute == pytest.approx(150e-6, rel=1e-9)
    assert got.backward == base.backward


def test_no_recompute_no_checkpoint_cost():
    cost, plain = _costs(3.0, 150e-6), _costs(1.0, 0.0)
    dt, group = cost.dtypes(0, 1), Group((0,), 8)
    assert cost.block(1, 2, False, "none", group, dt) == plain.block(1, 2, False, "none", group, dt)


def test_megatron_and_deepspeed_carry_no_checkpoint_figures():
    for name in ("megatron", "deepspeed"):
        host = load_engine(name).host
        assert host.recompute_kernel_factor == 1.0 and host.checkpoint_forward_s == 0.0


def test_fit_checkpoint_recovers_known_figures():
    per_kernel, overhead, factor, entry = 5e-6, 1e-6, 2.5, 140e-6
    blocks = {}
    for name, n in (("a", 20), ("b", 31)):
        f, b = n * (per_kernel + overhead), 2 * n * (per_kernel + overhead)
        blocks[name] = {"forward_s": f, "backward_s": b, "forward_kernels": n,
                        "checkpointed_forward_s": f + entry,
                        "checkpointed_backward_s": b + n * (factor * per_kernel + overhead)}
    got = fit_checkpoint(blocks, per_kernel, overhead)
    assert got["checkpoint_forward_s"] == pytest.approx(entry)
    assert got["recompute_kernel_factor"] == pytest.approx(factor)
