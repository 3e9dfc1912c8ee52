"""Plans for the export tests, made through the cost model as `meshplan estimate -o` makes them."""

from __future__ import annotations

from planner.cost.model import CostModel
from planner.engine import load_engine
from planner.loaders import load_cluster
from planner.plan import make_plan
from planner.presets import PRESETS
from planner.specs import ParallelConfig, TrainingSpec

# name -> (preset, cluster, nodes, training, parallel config). An MoE plan joins these (and the round-trip and
# engine lists of tests/test_export*.py) once ModelSpec describes experts: megatron.model_args is where its
# --num-experts / --moe-router-topk / --expert-model-parallel-size go, and the readers' refusal of those flags
# is where they are read back.
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
}
ORDERS = {"gpt_fp16_pp": ("tp", "pp", "dp")}


def make_test_plan(name: str, engine: str = "meshplan"):
    """The plan of PLANS[name] as `meshplan estimate --engine ENGINE -o` writes it."""
    preset, cluster_name, nodes, training, cfg = PLANS[name]
    model, cluster = PRESETS[preset], load_cluster(cluster_name, nodes)
    training = TrainingSpec(**training)
    order = ORDERS.get(name, ("tp", "dp", "pp"))
    cost = CostModel(model, cluster, training, engine=load_engine(engine))
    pred = cost.evaluate(ParallelConfig(**cfg), order)
    return make_plan(cost.model, cluster, training, pred, engine=cost.engine)


def write_export(result, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, text in result.files.items():
        (directory / file_name).write_text(text)
