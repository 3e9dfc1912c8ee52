"""Memory model against the ZeRO paper, Korthikanti et al. and DeepSpeed's estimator."""

from __future__ import annotations

import pytest

from planner.cost.kernels import Dtypes
from planner.cost.memory import block_activation_bytes, in_flight_microbatches, interleaved_in_flight_chunks, state_bytes
from planner.engine import load_engine
from planner.specs import ModelSpec


def test_zero_table1(reference):
    """ZeRO (arXiv:1910.02054) Table 1, mixed-precision Adam, GB = 1e9 bytes, with DeepSpeed's fp16 recipe
    (the state bytes the cost model charges): within 2%, or within the rounding of the printed digits for the
    smallest entries (0.12 GB printed for 0.1172)."""
    rows = reference("zero_table1_model_state_memory.csv")
    assert len(rows) >= 30
    recipe = load_engine("deepspeed").memory["fp16"]
    for row in rows:
        sb = state_bytes(recipe, "adam", int(row["zero_stage"]), int(row["dp_degree"]))
        got = float(row["params"]) * sb.total / 1e9
        printed = row["model_state_gb_per_device"]
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        rounding = 0.5 * 10 ** -decimals
        assert abs(got - float(printed)) <= max(0.02 * float(printed), rounding), row


def test_deepspeed_zero3_estimator(reference):
    """DeepSpeed's estimate_zero3_model_states_mem_needs (no offload): GPU = 18P/N + 4*Lmax bytes, where 18P/N
    is the sharded fp16/fp32 states (bf16 recipe with fp32 grads here) and 4*Lmax the largest layer's 16-bit
    parameters and gradients gathered."""
    row = next(r for r in reference("deepspeed_memory_estimator_examples.csv")
               if r["stage"] == "3" and r["offload_param"] == "none" and r["offload_optimizer"] == "none")
    P, lmax, N = 2851e6, 32e6, 8
    sb = state_bytes(load_engine("deepspeed").memory["bf16"], "adam", 3, N)
    got = (P * sb.total + 4 * lmax) / 2 ** 30
    assert got == pytest.approx(float(row["doc_gpu_gib"]), abs=0.01)


KORTHIKANTI_GPT = dict(attention_kernel="eager", dropout=0.1, mlp="gelu", norm="layernorm", bias=True)


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 12288, 96, 8), (2048, 4, 6144, 64, 8), (1024, 2, 2048, 16, 4),
                                       (4096, 1, 16384, 128, 8)])
def test_korthikanti_table2(reference, s, b, h, a, t):
    """Korthikanti et al. (arXiv:2205.05198) Table 2, evaluated from the CSV's formula strings."""
    formulas = {r["configuration"]: r["bytes_per_layer_formula"] for r in
                reference("korthikanti_activation_memory_formulas.csv")}
    m = ModelSpec(num_layers=1, hidden_size=h, num_heads=a, vocab_size=1000, max_position_embeddings=s,
                  **KORTHIKANTI_GPT)
    dt = Dtypes.of("bf16")
    env = dict(s=s, b=b, h=h, a=a, t=t)

    def expect(name: str) -> float:
        return eval(formulas[name], {}, env)  # the published formula text, evaluated

    cases = {
        "no parallelism": (1, False, "none"),
        "tensor parallel (baseline)": (t, False, "none"),
        "tensor + sequence parallel": (t, True, "none"),
        "tensor parallel + selective activation recomputation": (t, False, "selective"),
        "tensor + sequence parallel + selective activation recomputation": (t, True, "selective"),
        "full activation recomputation": (t, False, "full"),
    }
    for name, (tp, sp, recompute) in cases.items():
        env["t"] = tp if tp > 1 else 1
        got = block_activation_bytes(m, b, s, tp, sp, recompute, dt)
        # the table leaves out the norms' fp32 mean and 1/std per row (2 norms x 8 bytes per token)
        stats = 0 if recompute == "full" else 2 * 8 * s * b / (tp if sp else 1)
        assert got - stats == pytest.approx(expect(name), rel=1e-9), name


def test_flash_and_no_dropout_drop_the_score_matrices():
    """Without dropout and with a fused kernel nothing grows with s^2 (per token the bytes are constant)."""
    m = ModelSpec(num_layers=1, hidden_size=4096, num_heads=32, vocab_size=1000, max_position_embeddings=8192,
                  attention_kernel="flash", dropout=0.0)
    dt = Dtypes.of("bf16")
    per_token = [block_activation_bytes(m, 1, s, 1, False, "none", dt) / s for s in (1024, 4096, 8192)]
    assert per_token[0] == pytest.approx(per_token[2], rel=1e-9)


def test_gqa_and_swiglu_terms():
    """Flash attention keeps q, k, v, out (2 bytes each) + fp32 LSE; GQA shrinks k and v by k/a; SwiGLU keeps
    gate, up and their product (3 f-wide tensors)."""
    h, a, k, f, s = 4096, 32, 8, 14336, 2048
    m = ModelSpec(num_layers=1, hidden_size=h, num_heads=a, num_kv_heads=k, ffn_hidden_size=f, vocab_size=1000,
                  max_position_embeddings=s, attention_kernel="flash", dropout=0.0, mlp="swiglu", norm="rmsnorm",
                  bias=False, position_embedding="rope")
    expected = s * (2 * (h * 2 + 4) + 2 * h * 2      # norm inputs and 1/rms, QKV and fc1 inputs
                    + 2 * (2 * h + 2 * h * k / a)    # q, out; k, v at kv heads
                    + 4 * a                          # log-sum-exp per head and row
                    + 2 * 3 * f)                     # gate, up, product
    assert block_activation_bytes(m, 1, s, 1, False, "none", Dtypes.of("bf16")) == pytest.approx(expected)


def test_in_flight_counts():
    """1F1B: stage i holds p - i micro-batches (SC21 Sec. 2.2.1); interleaving holds L(1 + (p-1)/(pv)) layers'
    worth on the first stage (Korthikanti et al. Sec. 4.2.3)."""
    assert [in_flight_microbatches("1f1b", 4, i, 16) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("gpipe", 4, 0, 16) == 16
    p, v = 4, 2
    held = interleaved_in_flight_chunks(p, v, 0, 16)
    layers_per_chunk = 1
    assert sum(held) * layers_per_chunk == pytest.approx(p * v * (1 + (p - 1) / (p * v)))
