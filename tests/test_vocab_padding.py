"""Any vocabulary at any tensor-parallel degree: the vocabulary is padded as Megatron-LM pads it, the cost
model counts the padded rows, and plan and run agree on which degrees shard a model (the MLP width must
divide; the vocabulary never has to). The runtime's losses with padded vocabularies are checked against the
unpadded reference in test_runtime_exactness.py."""

from __future__ import annotations

from collections import Counter

import pytest

from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.model import CostModel
from planner.cost.params import padded_vocab_size
from planner.errors import InputError
from planner.loaders import load_cluster
from planner.search.space import Constraints, enumerate_space
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from planner.validate import check_config

GPT2 = ModelSpec(name="gpt2-medium", num_layers=24, hidden_size=1024, num_heads=16, vocab_size=50257,
                 max_position_embeddings=1024)


def megatron_padding(vocab: int, multiple: int, tp: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`, as its loop reads: add dummy tokens until the size divides
    make_vocab_size_divisible_by * tensor_model_parallel_size."""
    after = vocab
    while after % (multiple * tp):
        after += 1
    return after


@pytest.mark.parametrize("vocab", [1, 100, 500, 512, 32000, 50257, 128256, 151936])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8, 16])
def test_padding_is_megatrons(vocab, tp):
    m = GPT2.model_copy(update={"vocab_size": vocab})
    assert padded_vocab_size(m, tp) == megatron_padding(vocab, 128, tp)
    assert padded_vocab_size(m, tp, multiple=64) == megatron_padding(vocab, 64, tp)


def test_gpt2_vocabulary_pads_to_the_published_sizes():
    """Megatron-LM's log for GPT-2 at tp 1: 'padded vocab (size: 50257) with 47 dummy tokens (new size:
    50304)'; nanoGPT uses the same 50,304."""
    assert padded_vocab_size(GPT2, 1) == 50304
    assert padded_vocab_size(GPT2, 8) == 51200


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_the_cost_model_costs_the_padded_vocabulary(tp):
    """A 50,257-token model costs exactly what the same model with its padded vocabulary costs, in time and
    in every memory figure; only the model FLOPs behind MFU count the real vocabulary."""
    cluster = load_cluster("dgx-a100-80gb", nodes=1)
    training = TrainingSpec(global_batch=64, seq_len=1024)
    padded = GPT2.model_copy(update={"vocab_size": padded_vocab_size(GPT2, tp)})
    cfg = {1: ParallelConfig(tp=1, pp=2, dp=4, mbs=2), 2: ParallelConfig(tp=2, pp=2, dp=2, mbs=2),
           8: ParallelConfig(tp=8, mbs=2)}[tp]
    real = CostModel(GPT2, cluster, training).evaluate(cfg)
    same = CostModel(padded, cluster, training).evaluate(cfg)
    assert real.predicted.step_time_s == same.predicted.step_time_s
    assert real.predicted.memory == same.predicted.memory
    assert real.predicted.hardware_tflops_per_gpu == pytest.approx(same.predicted.hardware_tflops_per_gpu,
                                                                   rel=1e-12)
    ratio = model_flops_per_step(GPT2, 64, 1024) / model_flops_per_step(padded, 64, 1024)
    assert real.predicted.mfu == pytest.approx(same.predicted.mfu * ratio, rel=1e-12)
    if padded.vocab_size != GPT2.vocab_size:
        assert ratio < 1


def test_hardware_flops_count_the_padded_logits():
    tokens = 8 * 1024
    extra = 3 * 2 * tokens * 1024 * (51200 - 50257)     # forward and backward of the padding columns
    assert hardware_flops_per_step(GPT2, 8, 1024, False, tp=8) == pytest.approx(
        model_flops_per_step(GPT2, 8, 1024) + extra, rel=1e-12)


def test_plan_and_run_agree_on_which_tp_shards_a_model():
    """MLP width 1,002 divides by 2 only: the search never proposes tp 4 or 8, and estimate refuses them
    with the valid degrees; the 50,257-token vocabulary restricts nothing."""
    model = GPT2.model_copy(update={"ffn_hidden_size": 1002})
    cluster = load_cluster("dgx-a100-80gb", nodes=1)
    training = TrainingSpec(global_batch=64, seq_len=1024)
    seen = {c.tp for c in enumerate_space(model, cluster, training, Constraints(), Counter())}
    assert seen == {1, 2}
    assert {c.tp for c in enumerate_space(GPT2, cluster, training, Constraints(), Counter())} == {1, 2, 4, 8}
    for tp in (4, 8):
        with pytest.raises(InputError) as exc:
            check_config(model, cluster, training, ParallelConfig(tp=tp, dp=8 // tp))
        assert str(exc.value) == f"--tp: tp {tp} does not divide ffn_hidden_size 1002 (valid tp: 1, 2)"
