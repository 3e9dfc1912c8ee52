"""The memory tracer (`profiler.memory_trace`) against exact counts it does not compute itself.

Independent sources:
  * parameter, gradient and optimizer-state bytes from the GPT-2 architecture's parameter shapes (Radford
    et al. 2019, written out below from the ModelSpec, not read from the runtime), sharded over dim 0 with
    padding as FSDP2 documents (`fully_shard`: "shards on dim-0"), or split as Megatron's tensor parallelism
    does (Shoeybi et al. 2019);
  * the optimizer's temporaries from reading torch 2.13's `_single_tensor_adam` / `_multi_tensor_adam`
    (the rules are listed in profiler/memory_trace.py's docstring);
  * saved activations against the profiler's own saved-tensor counter (`profiler.layers`, which measures
    each piece alone), and the whole traced run's losses against the single-process reference run;
  * 1F1B / GPipe in-flight micro-batches (Narayanan et al. 2021: stage i of p holds p - i in 1F1B, all m
    in GPipe) and the receive buffers torch.distributed.pipelining allocates (one per micro-batch);
  * what torch.distributed.pipelining does with FSDP2 (stage.py: no gradient sync and no reshard after
    backward until `perform_reduce_grad`): unsharded parameters and gradients held until the reduction.

Multi-process traces run in two launches (2 and 4 gloo processes) that batch every configuration.
"""

from __future__ import annotations

import math

import pytest
import torch

from profiler.memory_trace import launch_traces, trace_in_process
from profiler.storage_ledger import CATEGORIES, StorageLedger
from tests.runtime_helpers import make_test_plan, model_spec, reference_losses, relative_error

SPEC = model_spec("gpt-tiny", {"tied_embeddings": False})      # tied weights are issue 9's; see the report
BATCH, SEQ = 8, 32
FP32, BF16, INT64 = 4, 2, 8


# ----------------------------------------------------------------------------------------------
# Hand counts
# ----------------------------------------------------------------------------------------------
def gpt_shapes(spec, layers: range, first: bool, last: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a GPT-2 piece in module order (embedding, blocks, head):
    LayerNorm with bias, q/k/v/o and fc1/fc2 with biases, learned positions, untied head."""
    h, f, v = spec.hidden_size, spec.ffn_size, spec.vocab_size
    out = []
    if first:
        out += [("tok", (v, h)), ("pos", (spec.max_position_embeddings, h))]
    for i in layers:
        out += [(f"{i}.norm1.w", (h,)), (f"{i}.norm1.b", (h,))]
        for proj in "qkvo":
            out += [(f"{i}.{proj}.w", (h, h)), (f"{i}.{proj}.b", (h,))]
        out += [(f"{i}.norm2.w", (h,)), (f"{i}.norm2.b", (h,)), (f"{i}.fc1.w", (f, h)), (f"{i}.fc1.b", (f,)),
                (f"{i}.fc2.w", (h, f)), (f"{i}.fc2.b", (h,))]
    if last:
        out += [("head.norm.w", (h,)), ("head.norm.b", (h,)), ("head.proj.w", (v, h))]
    return out


def whole(spec=SPEC):
    return gpt_shapes(spec, range(spec.num_layers), True, True)


def numel(shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def sharded(shapes, ws: int) -> list[tuple[str, tuple[int, ...]]]:
    """FSDP2's local shard of each parameter: dim 0 split over `ws` ranks, padded to ceil(d0 / ws) rows."""
    return [(n, (-(-s[0] // ws),) + s[1:]) for n, s in shapes]


def linear_numel(spec=SPEC) -> int:
    """Weights and biases of every nn.Linear (what autocast casts to bf16): q, k, v, o, fc1, fc2, head."""
    linears = ("q", "k", "v", "o", "fc1", "fc2", "proj")
    return sum(math.prod(s) for n, s in whole(spec) if n.count(".") and n.split(".")[-2] in linears)


def adam_state_bytes(shapes) -> int:
    """exp_avg and exp_avg_sq like each parameter (fp32) plus its 4-byte fp32 `step`."""
    return 2 * FP32 * numel(shapes) + 4 * len(shapes)


def for_loop_adam_temporaries(shapes) -> int:
    """`_single_tensor_adam`: the sqrt and the quotient of parameter i alive while `denom` still holds
    parameter i-1's: max over i of 2 s_i + s_(i-1)."""
    sizes = [FP32 * math.prod(s) for _, s in shapes]
    return max(2 * s + (sizes[i - 1] if i else 0) for i, s in enumerate(sizes))


def foreach_adam_temporaries(shapes) -> int:
    """`_multi_tensor_adam`: `_foreach_sqrt(exp_avg_sqs)`, one tensor per parameter of the group at once."""
    return FP32 * numel(shapes)


def record(result: dict, phase: str, step: int, microbatch: int | None = None, stage: int | None = None) -> dict:
    found = [r for r in result["records"] if r["phase"] == phase and r["step"] == step
             and (microbatch is None or r["microbatch"] == microbatch) and (stage is None or r["stage"] == stage)]
    assert len(found) == 1, (phase, step, microbatch, stage, [(r["phase"], r["step"]) for r in result["records"]])
    return found[0]


def build_end(result: dict) -> dict:
    return result["records"][0]["end_by_category"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# The ledger on tiny modules
# ----------------------------------------------------------------------------------------------
def _two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48))


LINEAR_SHAPES = [("w1", (32, 64)), ("b1", (32,)), ("w2", (48, 32)), ("b2", (48,))]


def _ledger_steps(make_optimizer, steps: int = 2) -> list[dict]:
    """Two optimizer steps of two Linears under a ledger; categories assigned by hand as a caller would."""
    model = _two_linears()
    x = torch.randn(16, 64)
    ledger = StorageLedger()
    with ledger:
        ledger.begin("build")
        opt = make_optimizer(model.parameters())
        for p in model.parameters():
            ledger.assign(p, "parameters")
        for _ in range(steps):
            ledger.begin("forward")
            loss = model(x).square().mean()
            ledger.begin("backward")
            loss.backward()
            del loss
            for p in model.parameters():
                ledger.assign(p.grad, "gradients")
            ledger.begin("optimizer")
            opt.step()
            for state in opt.state.values():
                for t in state.values():
                    ledger.assign(t, "optimizer_states")
            ledger.begin("zero_grad")
            opt.zero_grad(set_to_none=True)
        ledger.begin("end")
    return ledger.timeline()


@pytest.mark.parametrize("name,make,temporaries,states", [
    ("adamw for-loop", lambda p: torch.optim.AdamW(p, weight_decay=0.1, foreach=False),
     for_loop_adam_temporaries(LINEAR_SHAPES), adam_state_bytes(LINEAR_SHAPES)),
    ("adamw foreach", lambda p: torch.optim.AdamW(p, weight_decay=0.1, foreach=True),
     foreach_adam_temporaries(LINEAR_SHAPES), adam_state_bytes(LINEAR_SHAPES)),
    ("adamw fused", lambda p: torch.optim.AdamW(p, weight_decay=0.1, fused=True), 0, adam_state_bytes(LINEAR_SHAPES)),
    # Adam's L2 weight decay: grad.add(param) is one more parameter-sized tensor in the for-loop
    ("adam+wd for-loop", lambda p: torch.optim.Adam(p, weight_decay=0.1, foreach=False),
     3 * FP32 * 32 * 64, adam_state_bytes(LINEAR_SHAPES)),
    ("adam+wd foreach", lambda p: torch.optim.Adam(p, weight_decay=0.1, foreach=True),
     foreach_adam_temporaries(LINEAR_SHAPES), adam_state_bytes(LINEAR_SHAPES)),
    ("sgd momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0, FP32 * numel(LINEAR_SHAPES)),
])
def test_optimizer_step_bytes_of_two_linears(name, make, temporaries, states):
    records = _ledger_steps(make)
    n = FP32 * numel(LINEAR_SHAPES)
    for opt in [r for r in records if r["phase"] == "optimizer"]:
        cat = opt["by_category"]
        assert cat["parameters"] == n and cat["gradients"] == n, name
        assert cat["optimizer_states"] == states, name
        assert cat["temporaries"] == temporaries == opt["own_temporaries_max"], name
    after = [r for r in records if r["phase"] == "zero_grad"][-1]["end_by_category"]
    assert after["gradients"] == 0 and after["temporaries"] == 0 and after["optimizer_states"] == states


def test_storage_resize_is_tracked():
    """FSDP2 frees and re-allocates unsharded parameters with UntypedStorage.resize_."""
    ledger = StorageLedger()
    with ledger:
        ledger.begin("alloc")
        t = torch.empty(1000)
        t.add_(1)                                   # an op that shows the storage
        ledger.begin("freed")
        t.untyped_storage().resize_(0)
        ledger.begin("again")
        t.untyped_storage().resize_(4000)
        ledger.begin("end")
    alloc, freed, again = ledger.timeline()[:3]
    assert alloc["end_bytes"] == 4000
    assert freed["peak_bytes"] == 4000 and freed["end_bytes"] == 0
    assert again["peak_bytes"] == 4000 and again["end_bytes"] == 4000


def test_a_graph_no_backward_consumes_is_freed():
    """A forward with grad whose output is dropped frees its saved tensors (pipelining's metadata inference
    does this); the ledger's own saved-tensor hook must not keep them alive."""
    model = _two_linears()
    x = torch.randn(16, 64)
    ledger = StorageLedger()
    with ledger:
        ledger.begin("forward")
        for p in model.parameters():
            ledger.assign(p, "parameters")
        out = torch.nn.functional.gelu(model(x)).exp()
        ledger.begin("dropped")
        del out
        ledger.begin("end")
    forward, dropped = ledger.timeline()[:2]
    hidden, outputs = 16 * 48 * FP32, 16 * 48 * FP32                # Linear 2's output (gelu input), exp's
    assert forward["end_by_category"]["saved_activations"] == x.nbytes + 16 * 32 * FP32 + hidden + outputs
    # only the input the test still holds stays
    assert dropped["end_by_category"]["saved_activations"] == x.nbytes
    assert dropped["end_by_category"]["temporaries"] == 0


def test_recomputed_activations_count_as_saved():
    """Under full recompute the backward rebuilds the block's saved tensors: they are saved activations, at
    most as many bytes as the block saves without recompute (profiler.layers' counter)."""
    from profiler.layers import measure_block
    from runtime.models import TransformerBlock

    spec = model_spec("llama-tiny")
    block = TransformerBlock(spec, 1, 0, "full")
    x = torch.randn(2, 32, spec.hidden_size, requires_grad=True)
    ledger = StorageLedger()
    with ledger:
        ledger.begin("forward")
        for p in block.parameters():
            ledger.assign(p, "parameters")
        out = block(x)
        ledger.begin("backward")
        out.sum().backward()
        ledger.begin("end")
    forward, backward = ledger.timeline()[:2]
    kept = measure_block(spec, 1, 2, 32, "full", "fp32", torch.device("cpu"), warmup=0, reps=1).activation_bytes
    full = measure_block(spec, 1, 2, 32, "none", "fp32", torch.device("cpu"), warmup=0, reps=1).activation_bytes
    assert forward["end_by_category"]["saved_activations"] == kept
    assert backward["max_by_category"]["saved_activations"] == full


# ----------------------------------------------------------------------------------------------
# The runtime's training steps, one process
# ----------------------------------------------------------------------------------------------
ONE_RANK = {
    "mb1": ({"mbs": 8}, {}),
    "mb2": ({"mbs": 4}, {}),
    "full": ({"mbs": 8, "recompute": "full"}, {}),
    "foreach": ({"mbs": 8}, {"foreach": True}),
    "sgd": ({"mbs": 8, "optimizer": "sgd"}, {}),
    "amp": ({"mbs": 8, "precision": "bf16"}, {"cuda_precision": True}),
}


@pytest.fixture(scope="module")
def one_rank():
    out = {}
    for name, (config, options) in ONE_RANK.items():
        config = dict(config)
        extra = {k: config.pop(k) for k in ("optimizer", "precision") if k in config}
        plan = make_test_plan(SPEC, BATCH, SEQ, **extra, **config)
        out[name] = trace_in_process(plan, steps=2, **options)
    return out


def test_traced_training_is_the_real_training(one_rank):
    """The losses of the traced steps are the single-process reference's (so the trace ran the runtime's
    training, unchanged by the counting)."""
    ref = reference_losses(SPEC, BATCH, SEQ, 2)
    for name in ("mb1", "mb2", "full", "foreach"):
        assert relative_error(one_rank[name]["losses"], ref) < 1e-5, name
    assert one_rank["mb1"]["optimizer_impl"] == "for-loop" and one_rank["foreach"]["optimizer_impl"] == "foreach"


@pytest.mark.parametrize("name", ["mb1", "mb2", "full", "foreach", "amp"])
def test_one_rank_states_are_exact(one_rank, name):
    result = one_rank[name]
    n = FP32 * numel(whole())
    nmb = BATCH // ONE_RANK[name][0]["mbs"]
    built = build_end(result)
    assert built["parameters"] == n
    assert all(built[c] == 0 for c in CATEGORIES if c not in ("parameters", "temporaries"))
    for step in (1, 2):
        done = record(result, "backward", step, nmb - 1)["end_by_category"]
        assert done["gradients"] == n and done["gradient_buffers"] == 0
        # what stays saved: the token ids and targets, [batch, seq] int64 each, still held by the step
        assert done["saved_activations"] == 2 * BATCH * SEQ * INT64
        opt = record(result, "optimizer", step)
        assert opt["end_by_category"]["optimizer_states"] == adam_state_bytes(whole())
        zeroed = record(result, "zero_grad", step)["end_by_category"]
        assert zeroed["gradients"] == 0 and zeroed["parameters"] == n
        assert zeroed["optimizer_states"] == adam_state_bytes(whole())


@pytest.mark.parametrize("name,expected", [
    ("mb1", for_loop_adam_temporaries(whole())),
    ("foreach", foreach_adam_temporaries(whole())),
    ("sgd", 0),
])
def test_one_rank_optimizer_temporaries(one_rank, name, expected):
    result = one_rank[name]
    for step in (1, 2):
        opt = record(result, "optimizer", step)
        assert opt["own_temporaries_max"] == expected
        # the phase's peak is where they are: nothing else is made or freed during the step
        before = record(result, "backward", step, 0)["end_by_category"]["temporaries"]
        assert opt["by_category"]["temporaries"] - before == expected
    if name == "sgd":
        assert record(result, "optimizer", 2)["end_by_category"]["optimizer_states"] == FP32 * numel(whole())


def _profiled_saved_bytes(spec, mbs: int, recompute: str) -> int:
    """Saved bytes of the embedding, every block and the head with its loss, each measured alone by the
    profiler's saved-tensor counter."""
    from profiler.layers import measure_block, measure_embedding, measure_head

    cpu = torch.device("cpu")
    emb = measure_embedding(spec, 1, mbs, SEQ, "fp32", cpu, warmup=0, reps=1).activation_bytes
    block = measure_block(spec, 1, mbs, SEQ, recompute, "fp32", cpu, warmup=0, reps=1).activation_bytes
    head = measure_head(spec, 1, mbs, SEQ, "fp32", cpu, warmup=0, reps=1).activation_bytes
    return emb + spec.num_layers * block + head


@pytest.mark.parametrize("name,recompute", [("mb1", "none"), ("full", "full")])
def test_saved_activations_match_the_profiler_counter(one_rank, name, recompute):
    expected = _profiled_saved_bytes(SPEC, BATCH, recompute)
    for step in (1, 2):
        forward = record(one_rank[name], "forward", step, 0)
        assert forward["end_by_category"]["saved_activations"] == expected


def test_micro_batches_accumulate_into_one_gradient(one_rank):
    """Two micro-batches: the second forward starts after the first's graph is freed, and both backwards
    accumulate into the same gradient storage."""
    result = one_rank["mb2"]
    first, second = (record(result, "forward", 2, i)["end_by_category"] for i in (0, 1))
    assert first["saved_activations"] == second["saved_activations"]
    n = FP32 * numel(whole())
    assert record(result, "backward", 2, 0)["end_by_category"]["gradients"] == n
    assert second["gradients"] == n


def test_autocast_keeps_bf16_copies_of_the_linear_weights(one_rank):
    """amp-bf16 (autocast over fp32 parameters): the forward keeps one bf16 copy of every Linear's weight and
    bias (autocast's weight cache) until the step's autocast region ends; gradients stay fp32."""
    result = one_rank["amp"]
    assert result["precision_run"] == "amp-bf16"
    for step in (1, 2):
        forward = record(result, "forward", step, 0)["end_by_category"]
        assert forward["parameter_copies"] == BF16 * linear_numel()
        assert record(result, "optimizer", step)["by_category"]["parameter_copies"] == 0


# ----------------------------------------------------------------------------------------------
# Two processes: data parallelism (replicate, ZeRO 1-3, bf16 FSDP2) and two pipeline stages
# ----------------------------------------------------------------------------------------------
TWO_RANKS = {
    "zero0": dict(config={"dp": 2, "zero": 0, "mbs": 2}),
    "zero1": dict(config={"dp": 2, "zero": 1, "mbs": 2}),
    "zero2": dict(config={"dp": 2, "zero": 2, "mbs": 2}),
    "zero3": dict(config={"dp": 2, "zero": 3, "mbs": 2}),
    "zero3-bf16": dict(config={"dp": 2, "zero": 3, "mbs": 2}, precision="bf16", options={"cuda_precision": True}),
    "tp2": dict(config={"tp": 2, "mbs": 4}),
    "1f1b": dict(config={"pp": 2, "mbs": 2}),
    "gpipe": dict(config={"pp": 2, "mbs": 2, "schedule": "gpipe"}),
}


def _jobs(table: dict) -> list[dict]:
    return [{"name": name, "plan": make_test_plan(SPEC, BATCH, SEQ, precision=job.get("precision", "fp32"),
                                                  **job["config"]), "steps": job.get("steps", 2),
             **job.get("options", {})} for name, job in table.items()]


@pytest.fixture(scope="module")
def two_ranks():
    return launch_traces(_jobs(TWO_RANKS), nproc=2, timeout_s=900)


ROOT = [s for s in whole() if not s[0][0].isdigit()]          # the chunk's own parameters: embedding and head


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3-bf16"])
def test_data_parallel_states(two_ranks, name):
    zero = TWO_RANKS[name]["config"]["zero"]
    local = whole() if zero == 0 else sharded(whole(), 2)
    n_full, n_local = FP32 * numel(whole()), FP32 * numel(local)
    nmb = BATCH // 2 // 2
    for result in two_ranks[name]:
        assert build_end(result)["parameters"] == n_local
        for step in (1, 2):
            forward = record(result, "forward", step, 0)["end_by_category"]
            # unsharded parameters after a forward: every one with ZeRO 0-2 (replicate keeps a copy too),
            # the root's (embedding, head: reshard_after_forward=False) with ZeRO-3; bf16 in the bf16 recipe
            width = BF16 if name.endswith("bf16") else FP32
            unsharded = numel(ROOT) if zero == 3 else numel(whole())
            assert forward["parameter_copies"] == width * unsharded, (name, step)
            first = record(result, "backward", step, 0)["end_by_category"]
            if zero <= 1:
                # whole gradients accumulate locally until the last micro-batch (DDP's no_sync, ZeRO-1)
                assert first["gradients"] + first["gradient_buffers"] == n_full
            else:
                assert first["gradients"] == n_local and first["gradient_buffers"] == 0
            last = record(result, "backward", step, nmb - 1)["end_by_category"]
            assert last["gradients"] == (n_full if zero == 0 else n_local) and last["gradient_buffers"] == 0
            assert last["parameter_copies"] == 0
            opt = record(result, "optimizer", step)
            assert opt["end_by_category"]["optimizer_states"] == adam_state_bytes(local)
            assert opt["own_temporaries_max"] == for_loop_adam_temporaries(local)


def tp_local(shapes, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    """Megatron's split (Shoeybi et al. 2019), as runtime.parallelize applies it: q, k, v, fc1 (weight and
    bias) column-parallel (dim 0 / tp), o and fc2 weights row-parallel (dim 1 / tp, bias whole), the token
    embedding and the head split by vocabulary (dim 0 / tp); norms and positions whole."""
    out = []
    for name, s in shapes:
        part = name.split(".")
        layer = part[-2] if len(part) > 1 else part[0]
        if layer in ("q", "k", "v", "fc1") or name in ("tok", "head.proj.w"):
            s = (s[0] // tp,) + s[1:]
        elif layer in ("o", "fc2") and part[-1] == "w":
            s = (s[0], s[1] // tp)
        out.append((name, s))
    return out


def test_tensor_parallel_states(two_ranks):
    """tp 2: each rank holds its Megatron shard of the parameters, their gradients and Adam states. The token
    embedding's gradient is the exception: the runtime's RowwiseParallel embedding gets a Replicate
    gradient, the whole [vocab, h] matrix on every rank (pinned here, so that a fix shows)."""
    local = tp_local(whole(), 2)
    n_local = FP32 * numel(local)
    vocab_rows = FP32 * SPEC.vocab_size * SPEC.hidden_size
    for result in two_ranks["tp2"]:
        assert build_end(result)["parameters"] == n_local
        for step in (1, 2):
            grads = record(result, "backward", step, 1)["end_by_category"]["gradients"]
            assert grads == n_local + vocab_rows // 2
            opt = record(result, "optimizer", step)
            assert opt["end_by_category"]["optimizer_states"] == adam_state_bytes(local)


def _stage_shapes(stage: int):
    half = SPEC.num_layers // 2
    return gpt_shapes(SPEC, range(stage * half, (stage + 1) * half), stage == 0, stage == 1)


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_pipeline_stages(two_ranks, name):
    mbs, nmb = 2, BATCH // 2
    act = FP32 * mbs * SEQ * SPEC.hidden_size              # one micro-batch's [mbs, seq, h] stage boundary
    logits = FP32 * mbs * SEQ * SPEC.vocab_size
    for result in two_ranks[name]:
        stage = result["coords"]["pp"]
        shapes = _stage_shapes(stage)
        assert build_end(result)["parameters"] == FP32 * numel(shapes)
        step = 2
        forwards = [record(result, "forward", step, i, stage) for i in range(nmb)]
        saved = [f["end_by_category"]["saved_activations"] for f in forwards]
        # micro-batches in flight at once: 1F1B stage i of p holds p - i, GPipe all of them; besides them
        # the step's token ids (stage 0) or targets (stage 1) stay saved, [batch, seq] int64
        in_flight = (2 - stage) if name == "1f1b" else nmb
        persistent = BATCH * SEQ * INT64
        assert max(saved) == persistent + in_flight * (saved[0] - persistent)
        # receive buffers, one per micro-batch, kept between steps; the last stage keeps the logits of each
        # micro-batch in flight until its backward
        recv = nmb * act
        assert record(result, "zero_grad", step)["end_by_category"]["pipeline_buffers"] == recv
        # (torch's Schedule1F1B also keeps micro-batch 0's output alive on stage 0: its send, waited, stays
        # in the warm-up's `send_work` list until the steady phase ends)
        held = max(f["end_by_category"]["pipeline_buffers"] for f in forwards)
        unsent = 1 if (name == "1f1b" and stage == 0) else 0
        assert held == recv + (in_flight + unsent) * (logits if stage == 1 else act)
        assert record(result, "optimizer", step)["end_by_category"]["optimizer_states"] == adam_state_bytes(shapes)


# ----------------------------------------------------------------------------------------------
# Four processes: pipelining with FSDP2
# ----------------------------------------------------------------------------------------------
FOUR_RANKS = {"pp2-zero3": dict(config={"pp": 2, "dp": 2, "zero": 3, "mbs": 2}, steps=1)}


@pytest.fixture(scope="module")
def four_ranks():
    return launch_traces(_jobs(FOUR_RANKS), nproc=4, timeout_s=900)


def test_pipelined_fsdp_holds_unsharded_parameters_and_gradients_until_the_reduction(four_ranks):
    """torch.distributed.pipelining's backward_maybe_with_nosync: no gradient sync and no reshard after
    backward, so after the first backward the stage holds all its parameters unsharded and whole fp32
    gradients, until perform_reduce_grad reduce-scatters and reshards (ZeRO-3 priced as ZeRO-1)."""
    for result in four_ranks["pp2-zero3"]:
        stage = result["coords"]["pp"]
        shapes = _stage_shapes(stage)
        n_full, n_local = FP32 * numel(shapes), FP32 * numel(sharded(shapes, 2))
        after_first = record(result, "backward", 1, 0, stage)["end_by_category"]
        assert after_first["parameter_copies"] == n_full
        assert after_first["gradient_buffers"] == n_full and after_first["gradients"] == 0
        reduced = record(result, "grad_reduce", 1, None, stage)["end_by_category"]
        assert reduced["gradients"] == n_local
        assert reduced["gradient_buffers"] == 0 and reduced["parameter_copies"] == 0
