"""Plans for the export tests, made through the cost model as `meshplan estimate -o` makes them."""

from __future__ import annotations

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.presets import PRESETS
from planner.specs import MLASpec, ModelSpec, MoESpec, ParallelConfig, TrainingSpec

# A Qwen2-MoE-like model with everything a MoE spec can say: the first layer dense, then every second layer
# MoE, a gated shared expert (two of width 512: one MLP of 1024 in Megatron), a sigmoid router, capacity 1.25
MOE_VARIANTS = ModelSpec(name="moe-variants", num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4,
                         ffn_hidden_size=2816, vocab_size=32000, max_position_embeddings=4096, tied_embeddings=False,
                         norm="rmsnorm", mlp="swiglu", bias=False, position_embedding="rope", rope_theta=1e6,
                         dropout=0.0, moe=MoESpec(num_experts=16, top_k=4, expert_ffn_size=512, shared_experts=2,
                                                  shared_expert_gate=True, first_dense_layers=1, every=2,
                                                  router="sigmoid", capacity_factor=1.25))

# DeepSeek-V3's block shape at a small width: latent attention with a q latent, sigmoid router, a shared expert
MLA_MOE = ModelSpec(name="mla-moe", num_layers=4, hidden_size=1024, num_heads=16, ffn_hidden_size=2816,
                    vocab_size=32000, max_position_embeddings=4096, tied_embeddings=False, norm="rmsnorm", mlp="swiglu",
                    bias=False, position_embedding="rope", dropout=0.0,
                    mla=MLASpec(kv_lora_rank=128, q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                v_head_dim=64),
                    moe=MoESpec(num_experts=16, top_k=4, expert_ffn_size=512, shared_experts=1, first_dense_layers=1,
                                router="sigmoid"))

# name -> (preset or model, cluster, nodes, training, parallel config)
PLANS = {
    # GPT-3 style: LayerNorm, GELU, learned positions, biases, tied embeddings
    "gpt_dense": ("gpt3-1.3b", "dgx-a100-80gb", 1, dict(global_batch=64, seq_len=2048, precision="bf16"),
                  dict(tp=2, pp=2, dp=2, mbs=2, zero=1, recompute="selective", sp=True)),
    # Llama with grouped-query attention, ZeRO-3, full recomputation
    "llama_gqa": ("llama3-8b", "dgx-h100", 2, dict(global_batch=64, seq_len=4096, precision="bf16"),
                  dict(tp=4, pp=1, dp=4, mbs=1, zero=3, recompute="full", sp=True)),
    # interleaved 1F1B with uneven chunks, in Megatron's precision recipe and in torchtitan's
    "interleaved_uneven": ("llama3-8b", "dgx-h100", 2, dict(global_batch=64, seq_len=4096, precision="bf16"),
                           dict(tp=2, pp=4, dp=2, vpp=2, mbs=1, zero=0, recompute="none", sp=True,
                                schedule="interleaved", layers_per_stage=[3, 4, 4, 5, 4, 4, 4, 4])),
    "interleaved_uneven_amp": ("llama3-8b", "dgx-h100", 2, dict(global_batch=64, seq_len=4096, precision="amp-bf16"),
                               dict(tp=2, pp=4, dp=2, vpp=2, mbs=1, zero=0, recompute="none", sp=True,
                                    schedule="interleaved", layers_per_stage=[3, 4, 4, 5, 4, 4, 4, 4])),
    # fp16 with loss scaling, uneven 1F1B stages, PP next to TP in the rank order
    "gpt_fp16_pp": ("gpt3-2.7b", "dgx-a100-80gb", 2, dict(global_batch=128, seq_len=2048, precision="fp16",
                                                         overlap_grad_reduce=False),
                    dict(tp=2, pp=4, dp=2, mbs=2, zero=0, recompute="full", layers_per_stage=[7, 9, 9, 7])),
    # DeepSpeed-shaped: AutoTP, ZeRO-2, no pipeline
    "gpt_zero2_tp": ("gpt3-1.3b", "dgx-a100-80gb", 1, dict(global_batch=64, seq_len=2048, precision="fp16"),
                     dict(tp=2, pp=1, dp=4, mbs=4, zero=2, recompute="full")),
    # DeepSpeed-shaped: pipeline with ZeRO-1
    "gpt_pipe_zero1": ("gpt3-1.3b", "dgx-a100-80gb", 1, dict(global_batch=64, seq_len=2048, precision="bf16"),
                       dict(tp=1, pp=2, dp=4, mbs=2, zero=1, recompute="full", layers_per_stage=[12, 12])),
    # torchtitan-shaped: FSDP2 without resharding (ZeRO-2) under a 1F1B pipeline, fp32
    "llama_zero2_pp": ("llama3-8b", "dgx-h100", 1, dict(global_batch=32, seq_len=2048, precision="fp32"),
                       dict(tp=1, pp=2, dp=4, mbs=2, zero=2, recompute="selective", layers_per_stage=[15, 17])),
    # mixture of experts on 2 DGX H100: Megatron-shaped (experts over 4 DP ranks, expert TP = tp 2, pipeline)
    "mixtral_ep_tp": ("mixtral-8x7b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                      dict(tp=2, pp=2, dp=4, ep=4, mbs=1, zero=1, recompute="selective", sp=True)),
    "qwen3_moe_ep": ("qwen3-30b-a3b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                     dict(tp=1, pp=1, dp=16, ep=8, mbs=1, zero=1, recompute="selective")),
    # torchtitan-shaped: EP inside FSDP2's shard dimension (ZeRO-3), full recomputation
    "qwen3_moe_fsdp": ("qwen3-30b-a3b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                       dict(tp=1, pp=1, dp=16, ep=8, mbs=1, zero=3, recompute="full")),
    # ... and under a 1F1B pipeline (FSDP2 without resharding)
    "qwen3_moe_pp": ("qwen3-30b-a3b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                     dict(tp=1, pp=2, dp=8, ep=8, mbs=1, zero=2, recompute="full", layers_per_stage=[23, 25])),
    # DeepSpeed-shaped: AutoEP over 8 ranks under ZeRO-3
    "mixtral_ep_zero3": ("mixtral-8x7b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                         dict(tp=1, pp=1, dp=16, ep=8, mbs=1, zero=3, recompute="full")),
    # what `meshplan plan -m mixtral-8x7b -c dgx-h100 --nodes 2 -b 32 -e megatron` picks: Megatron-FSDP, interleaved
    "mixtral_fsdp_interleaved": ("mixtral-8x7b", "dgx-h100", 2, dict(global_batch=32, seq_len=2048, precision="bf16"),
                                 dict(tp=2, pp=2, dp=4, ep=2, vpp=8, mbs=1, zero=2, recompute="none", sp=True,
                                      schedule="interleaved")),
    # every MoE field Megatron writes, with an interleaved pipeline
    "mla_moe": (MLA_MOE, "dgx-h100", 1, dict(global_batch=16, seq_len=4096, precision="bf16"),
                dict(tp=2, pp=2, dp=2, ep=2, mbs=1, zero=1, recompute="selective", sp=True)),
    "moe_variants": (MOE_VARIANTS, "dgx-h100", 1, dict(global_batch=16, seq_len=4096, precision="bf16"),
                     dict(tp=2, pp=2, dp=2, ep=2, vpp=2, mbs=1, zero=1, recompute="none", sp=True,
                          schedule="interleaved")),
}
ORDERS = {"gpt_fp16_pp": ("tp", "pp", "dp")}


def make_test_plan(name: str, engine: str = "meshplan"):
    """The plan of PLANS[name] as `meshplan estimate --engine ENGINE -o` writes it."""
    preset, cluster_name, nodes, training, cfg = PLANS[name]
    model = PRESETS[preset] if isinstance(preset, str) else preset
    cluster = load_cluster(cluster_name, nodes)
    training = TrainingSpec(**training)
    order = ORDERS.get(name, ("tp", "dp", "pp"))
    cost = CostModel(model, cluster, training, engine=load_engine(engine))
    pred = cost.evaluate(ParallelConfig(**cfg), order)
    return make_plan(cost.model, cluster, training, pred, engine=cost.engine)


def write_export(result, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, text in result.files.items():
        (directory / file_name).write_text(text)
