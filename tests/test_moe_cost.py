"""Expert parallelism in the cost model, against hand counts: the all-to-all on the links the EP group uses, the
MoE block's collectives and FLOPs, expert states per EP rank with ZeRO over the expert-data-parallel group,
the expert gradients' reduction, routed-token activations and the load-imbalance factor."""

import pytest

from planner.cost.comm import Group, Network
from planner.cost.kernels import Dtypes, block_work
from planner.cost.memory import block_activation_bytes, state_bytes
from planner.cost.model import CostModel
from planner.cost.moe import DEFAULT_IMBALANCE, imbalance
from planner.engine import load_engine
from planner.errors import InputError
from planner.loaders import load_cluster
from planner.parallel_dims import ParallelDims
from planner.presets import PRESETS
from planner.specs import MoESpec, ParallelConfig, TrainingSpec
from tests.cli_helpers import run_cli

MIXTRAL = PRESETS["mixtral-8x7b"]
H100 = load_cluster("dgx-h100", nodes=2)          # 450 GB/s NVLink (80%), 8 x 50 GB/s NICs (90%) per node
BF16 = Dtypes.of("bf16")


def test_all_to_all_follows_pairwise_exchange_on_the_groups_links():
    """(n-1) latencies; the bytes for other ranks of the node over NVLink and for other nodes over the NIC share
    at the same time (Thakur et al. 2005, pairwise exchange)."""
    net, M = Network(H100), 64e6
    nvlink, nic = 450e9 * 0.8, 50e9 * 0.9 * 8 / 8
    inside = Group.of(tuple(range(8)), 8)
    assert net.collective("all_to_all", M, inside) == pytest.approx(7 * 9.5e-6 + 7 / 8 * M / nvlink)
    across = Group.of(tuple(range(16)), 8)
    expected = 7 * 9.5e-6 + 8 * 10e-6 + max(7 / 16 * M / nvlink, 8 / 16 * M / nic)
    assert net.collective("all_to_all", M, across) == pytest.approx(expected)
    assert net.collective("all_to_all", M, across) > 3.5 * net.collective("all_to_all", M, inside)   # NICs: 1/8


@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 8), (2, 4)])
def test_moe_block_dispatch_combine_and_expert_flops(tp, ep):
    """Per MoE layer and micro-batch: two all-to-alls of tokens*k*h elements (the busiest rank's share, times
    the imbalance factor) in forward and two in backward (DESIGN.md Sec. 10); the experts' GEMMs compute k routed
    copies of every token (3 h f_e each, SwiGLU) at the same factor; the router 2 h E per token."""
    tokens, h, f, E, k = 4096, 4096, 14336, 8, 2
    lam = DEFAULT_IMBALANCE if ep > 1 else 1.0
    w = block_work(MIXTRAL, 1, tokens, tp, tp > 1, "none", BF16, moe_layer=True, ep=ep, imbalance=lam)
    a2a = [c for c in w.forward.collectives if c.op == "all_to_all"]
    if ep == 1:
        assert not a2a
    else:
        assert len(a2a) == 2 and all(c.group == "ep" for c in a2a)
        assert a2a[0].bytes == pytest.approx(tokens / tp * k * lam * h * 2)
        assert len([c for c in w.backward.collectives if c.op == "all_to_all"]) == 2
    gemms = [kn for kn in w.forward.kernels if kn.kind == "gemm"]
    router = [g for g in gemms if g.shape[1] == E]
    assert len(router) == 1 and router[0].flops == pytest.approx(2 * tokens / tp * h * E)
    experts = sum(g.flops for g in gemms if g.shape[0] == tokens * k * lam / (E / ep))
    assert experts == pytest.approx(2 * tokens * k * lam * 3 * h * f / tp)


def test_imbalance_default_override_and_capacity():
    """One expert per rank: the busiest expert's factor; E/ep experts per rank: its excess times the
    finite-population correction of a mean of E/ep loads drawn from E, sqrt((ep - 1)/(E - 1))."""
    t = TrainingSpec(global_batch=8, seq_len=4096)
    assert imbalance(MIXTRAL, t, 1) == 1.0
    assert imbalance(MIXTRAL, t, 8) == DEFAULT_IMBALANCE == 1.25
    assert imbalance(MIXTRAL, t, 2) == pytest.approx(1 + 0.25 * (1 / 7) ** 0.5)
    assert imbalance(MIXTRAL, t.model_copy(update={"moe_imbalance": 1.6}), 8) == 1.6
    capped = MIXTRAL.model_copy(update={"moe": MIXTRAL.moe.model_copy(update={"capacity_factor": 1.1})})
    assert imbalance(capped, t, 8) == 1.1


def _dense_params_by_hand(tp: int) -> float:
    """Mixtral's parameters outside the routed experts on one TP rank: attention, norms and router of 32 layers,
    the embedding and the LM head (vocabulary padded to 128 * tp rows, as Megatron does), the final norm."""
    h, L, V = 4096, 32, 32000
    attention = h * 4096 + 2 * h * 1024 + 4096 * h
    padded = -(-V // (128 * tp)) * 128 * tp
    return L * (attention / tp + 2 * h + h * 8) + 2 * padded * h / tp + h


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_expert_states_per_ep_rank(ep):
    """Megatron bf16 with the distributed optimizer (ZeRO-1) on dp 8: the experts' weights and gradients are
    held 1/ep, their fp32 master weights and moments sharded over the dp/ep ranks holding the same experts; the
    rest as a dense model over all dp ranks. The optimizer-phase states equal that count exactly."""
    t = TrainingSpec(global_batch=64, seq_len=4096)
    cost = CostModel(MIXTRAL, load_cluster("dgx-h100", nodes=8), t, engine=load_engine("megatron"))
    cfg = ParallelConfig(tp=1, pp=1, dp=64, ep=ep, zero=1, recompute="full")
    core = cost.evaluate_core(cfg)
    phase = cost.stage_timeline(cfg, 0, [32], core.nmb, cost.block(1, 1, False, "full",
                                cost.group(ParallelDims(dp=64), "tp"), cost.dtypes(1, 64)),
                                cost.dtypes(1, 64)).phases["optimizer"]
    recipe = cost.recipe(1, 64)
    dense, experts = _dense_params_by_hand(1), 32 * 8 * 3 * 4096 * 14336 / ep
    sd, se = state_bytes(recipe, "adamw", 1, 64), state_bytes(recipe, "adamw", 1, 64 // ep)
    assert phase.params == pytest.approx(dense * sd.weights + experts * se.weights, rel=1e-12)
    assert phase.grads == pytest.approx(dense * sd.grads + experts * se.grads, rel=1e-12)
    assert phase.optimizer == pytest.approx(dense * sd.optimizer + experts * se.optimizer, rel=1e-12)
    # the fp32 master weights and moments per GPU do not depend on ep: experts / ep over dp / ep ranks
    assert se.optimizer * experts == pytest.approx(sd.optimizer * 32 * 8 * 3 * 4096 * 14336)


def test_expert_gradients_reduce_over_the_expert_data_parallel_group():
    """ZeRO 0 on dp 8 inside one node, ep 4: the experts' gradients (the recipe's reduce_bytes each) all-reduced
    over the 2 ranks holding the same experts, block by block (32 calls + 1): the ring formula by hand."""
    one = load_cluster("dgx-h100", nodes=1)
    t = TrainingSpec(global_batch=64, seq_len=4096)
    cost = CostModel(MIXTRAL, one, t, engine=load_engine("megatron"))
    cfg = ParallelConfig(tp=1, pp=1, dp=8, ep=4, zero=0)
    groups = [cost.group(cfg.dims, d) for d in ("ep", "edp")]
    assert groups[0].ranks == (0, 1, 2, 3) and groups[1].ranks == (0, 4)
    experts = 32 * 8 * 3 * 4096 * 14336 / 4
    comm = cost.dp_comm(cfg, experts, 32, groups[1], 2)
    piece = experts * cost.recipe(0, 8).reduce_bytes / 33
    ring = 2 * 1 * 9.5e-6 + 2 * 1 / 2 * piece / (450e9 * 0.8)
    assert comm.last_bwd + comm.after == pytest.approx(33 * (ring + cost.host_coll))


def test_routed_token_activations():
    """A MoE layer keeps, per routed copy (k per token): its permuted input and the experts' output (h each),
    gate, up and product (f_e each); per token the router's fp32 scores (E) and the copies' weights (fp32) and
    expert indices (int64) — in place of the dense MLP's 3 f per token."""
    tokens, h, f, E, k = 4096, 4096, 14336, 8, 2
    moe = block_activation_bytes(MIXTRAL, 1, tokens, 1, False, "none", BF16, moe_layer=True, imbalance=1.0)
    dense = block_activation_bytes(MIXTRAL, 1, tokens, 1, False, "none", BF16)
    routed = tokens * k * (2 * h + 3 * f) * 2 + tokens * E * 4 + tokens * k * (4 + 8)
    assert moe - dense == pytest.approx(routed - tokens * 3 * f * 2)


def test_ep_shrinks_expert_memory_and_adds_all_to_all():
    t = TrainingSpec(global_batch=256, seq_len=4096)
    cost = CostModel(MIXTRAL, H100, t)
    base = dict(tp=2, pp=1, dp=8, zero=1, recompute="full", sp=True)
    one, eight = (cost.evaluate(ParallelConfig(**base, ep=e)) for e in (1, 8))
    assert eight.predicted.peak_memory_bytes < one.predicted.peak_memory_bytes / 2
    assert one.predicted.time.ep_comm == 0 and eight.predicted.time.ep_comm > 0


@pytest.mark.parametrize("args,message", [
    (["-m", "llama3-8b", "--ep", "2"], "--ep: ep 2 needs a mixture-of-experts model"),
    (["-m", "mixtral-8x7b", "--ep", "3"], "--ep: ep 3 does not divide dp 16"),
    (["-m", "qwen3-30b-a3b", "--dp", "16", "--ep", "16"], None),
    (["-m", "mixtral-8x7b", "--ep", "16"], "--ep: ep 16 does not divide num_experts 8 (valid ep: 1, 2, 4, 8)"),
    (["-m", "mixtral-8x7b", "--tp", "2", "--ep", "2"], "--sp: tp 2 with mixture-of-experts layers needs sequence"),
])
def test_estimate_refuses_bad_ep(capsys, args, message):
    r = run_cli(capsys, "estimate", "-c", "dgx-h100", "--nodes", "2", "-b", "64", "--seq", "4096", *args, "--json")
    if message is None:
        assert r.code == 0, r.err
        d = r.json()
        assert d["config"]["ep"] == 16
        assert d["model"]["params"] == 30_532_122_624 and d["model"]["active_params"] == 3_353_032_704
    else:
        assert r.code == 2 and message in r.err, r.err


def test_moe_spec_validation():
    with pytest.raises(ValueError, match="top_k 9 exceeds num_experts 8"):
        MoESpec(num_experts=8, top_k=9, expert_ffn_size=64)
    with pytest.raises(InputError):
        from planner.validate import check_experts
        check_experts(MIXTRAL, ParallelConfig(dp=4, ep=8))


def test_plan_for_mixtral_on_16_h100_uses_ep_where_it_is_faster(capsys, tmp_path):
    """64k tokens per step on 2 DGX H100 (Megatron engine), two pipeline stages (with four, whose hops are mostly
    NVLink, no EP is 1.1% faster): the winner shards the experts, and the plan says why, naming the links its EP
    group uses; the plan file carries the model object."""
    out = tmp_path / "plan.json"
    r = run_cli(capsys, "plan", "-m", "mixtral-8x7b", "-c", "dgx-h100", "--nodes", "2", "-b", "32", "--seq", "2048",
                "--pp", "2", "-e", "megatron", "--json", "-o", out)
    assert r.code == 0, r.err
    d = r.json()
    cfg = d["config"]
    assert cfg["ep"] > 1 and cfg["dp"] % cfg["ep"] == 0
    why = d["search"]["expert_parallelism"]
    assert why.startswith(f"expert parallelism: ep {cfg['ep']} wins")
    ranks = [row["rank"] for row in d["rank_layout"] if row["pp"] == 0 and row["tp"] == 0 and row["dp"] < cfg["ep"]]
    nodes = {r // 8 for r in ranks}
    assert ("inside one node (NVLink)" in why) == (len(nodes) == 1)
    assert d["model_summary"]["active_params"] == 12_879_925_248
    # the Megatron export writes it (tests/test_export*.py check what); the runtime takes its tp > 1 with ep > 1 (all
    # of `meshplan run`'s checks pass; it prints each node's command)
    r = run_cli(capsys, "export", out, "--to", "megatron", "-o", tmp_path / "exp")
    assert r.code == 0 and "--expert-model-parallel-size" in (tmp_path / "exp" / "args.txt").read_text()
    r = run_cli(capsys, "run", out, "--print-command")
    assert cfg["tp"] > 1
    assert r.code == 0 and r.out.count("-m runtime.train") == 2, r.err


def _moe_model(first_dense: int, every: int):
    from planner.specs import ModelSpec
    return ModelSpec(name=f"moe-d{first_dense}-e{every}", num_layers=8, hidden_size=256, num_heads=4,
                     vocab_size=1024, max_position_embeddings=512, ffn_hidden_size=1024, mlp="swiglu",
                     moe=MoESpec(num_experts=4, top_k=2, expert_ffn_size=512, first_dense_layers=first_dense,
                                 every=every))


@pytest.mark.parametrize("zero,ep", [(0, 1), (1, 2), (2, 2)])
def test_each_stage_is_priced_with_its_own_layers(zero, ep):
    """First two layers dense, six MoE, pp 2 at 4 + 4 blocks: stage 0 holds 2 dense + 2 MoE layers, which is the
    same mix as a stage of the model whose every second layer is MoE; stage 1 holds 4 MoE layers, as a stage of
    the all-MoE model does. Each stage's memory and per-micro-batch work equal those stages' exactly (a mean
    block over the whole model would give both stages 6/8 MoE)."""
    cluster = load_cluster("dgx-h100", nodes=1, gpus_per_node=4)
    training = TrainingSpec(global_batch=16, seq_len=512)
    cfg = ParallelConfig(tp=1, pp=2, dp=2, ep=ep, mbs=1, zero=zero, layers_per_stage=[4, 4])

    def core(first_dense: int, every: int):
        return CostModel(_moe_model(first_dense, every), cluster, training).evaluate_core(cfg)

    mixed, alternating, all_moe = core(2, 1), core(0, 2), core(0, 1)
    for stage, same in ((0, alternating), (1, all_moe)):
        got, want = mixed.stages[stage], same.stages[stage]
        for field in ("params", "grads", "optimizer", "activations", "other", "total"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-9), (stage, field)
        for pass_ in ("forward", "backward"):
            got_s, want_s = (dict(getattr(c.work, pass_)(stage, 0)) for c in (mixed, same))
            assert got_s == pytest.approx(want_s), (stage, pass_)
