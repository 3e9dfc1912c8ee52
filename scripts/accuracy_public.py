"""Predict every measured set in ../shared/reference/ with the built-in specs and the engine that ran it, and
the cross-validated error of calibrating on the set.

Sets (each row's engine and configuration as its source states them; assumptions where it is silent are listed
with the set):
  vtrain        1,440 Megatron-DeepSpeed iterations on 2-8 A100s (deepspeed engine, fp16, full recompute,
                gradients reduced during the backward: the step's fixed part does not grow from dp 2 to dp 8,
                e.g. 216.9 / 215.4 / 215.0 ms for h2048 L24 at 2 micro-batches per rank, where a reduction
                after the backward would add 11 ms at dp 2 and 20 ms at dp 8)
  korthikanti   Korthikanti et al. Table 5: 22B-1T GPTs on 8-512 A100s, full recompute vs SP + selective
                (megatron engine as run in 2022: eager fused-softmax attention, dropout 0.1, dp 1)
  sc21-ptdp     Megatron SC21 Table 2's PTD-P rows: 175B / 530B on 384-2240 A100s (megatron, tp 8, 1F1B, full
                recompute, gradients all-reduced after the backward as Megatron-LM did in 2021)
  sc21-zero3    the same table's ZeRO-3 rows without model parallelism (deepspeed engine, ZeRO-3, full
                recompute); both as achieved TFLOP/s per GPU
  llama3-405b   Llama 3 Table 4: 405B on 8,192 / 16,384 H100s, tp 8 pp 16 with FSDP that keeps parameters
                gathered (torchtitan engine at ZeRO-2, SP, interleaved 1F1B, no activation checkpointing as
                Sec. 3.3.2 states; the virtual stages are not published: the fastest is taken); the
                context-parallel row is skipped (no CP)
  h200-blocks   our own eager GPT blocks on one H200, forward + backward, each timed alone (meshplan engine)

Per set: rows, MAPE, signed mean error (+ = predicted too slow), Spearman rank correlation of step times
(TFLOP/s for sc21/llama3 are converted to step time), and the cross-validated MAPE of `calibrate`-style fits of
the set's identifiable parameters: leave-one-out for the small sets, 5-fold for vTrain's 1,440 rows.

    python scripts/accuracy_public.py              # every set
    python scripts/accuracy_public.py --set korthikanti --rows    # one set, row by row
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.calibrate import fit, with_params  # noqa: E402
from planner.cost.flops import model_flops_per_step  # noqa: E402
from planner.cost.kernels import block_work, isolated_pass_time  # noqa: E402
from planner.cost.model import CostModel  # noqa: E402
from planner.engine import EngineSpec, load_engine  # noqa: E402
from planner.loaders import load_cluster  # noqa: E402
from planner.presets import PRESETS  # noqa: E402
from planner.specs import ClusterSpec, ModelSpec, ParallelConfig, TrainingSpec  # noqa: E402

REFERENCE = next(p for p in (ROOT.parent / "shared" / "reference", ROOT / "tests" / "data" / "reference")
                 if (p / "vtrain_single_node_a100.csv").is_file())


def read(name: str) -> list[dict[str, str]]:
    with open(REFERENCE / name) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@dataclass
class Case:
    """One measured step: predict(cluster) -> seconds, with `cluster` the set's (possibly refitted) spec."""

    label: str
    measured_s: float
    predict: Callable[[ClusterSpec], float]


@dataclass
class Set:
    name: str
    cluster: ClusterSpec
    engine: EngineSpec
    cases: list[Case]
    fitted: list[tuple[str, float, float]]     # parameters a calibration on this set can identify
    folds: int = 0                             # 0: leave-one-out
    hopper: bool = False


def gpt(name: str, layers: int, hidden: int, heads: int, seq: int = 2048, **extra) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=51200,
                     max_position_embeddings=seq, tied_embeddings=True, dropout=0.1, attention_kernel="eager",
                     **extra)


def uniform(layers: int, chunks: int) -> list[int]:
    """Megatron-LM of 2021-22 splits the blocks evenly over the pipeline (layers divisible by its stages)."""
    return [layers // chunks] * chunks


def estimate(model: ModelSpec, cluster: ClusterSpec, nodes: int, gpn: int, training: TrainingSpec,
             engine: EngineSpec, cfg: ParallelConfig, cache: dict) -> Callable[[ClusterSpec], float]:
    """A predictor of one configuration's step time on `nodes` x `gpn` GPUs of a (refitted) cluster."""
    def predict(c: ClusterSpec) -> float:
        # cost models of the cluster asked last only: a fit asks for hundreds of clusters, and an id() of a
        # freed one can come back for the next (held here, so it cannot)
        if cache.get("cluster") is not c:
            cache.clear()
            cache["cluster"] = c
        key = (model.name, nodes, gpn, training.global_batch)
        cost = cache.get(key)
        if cost is None:
            cost = cache[key] = CostModel(model, c.resized(nodes, gpn), training, engine=engine)
        return cost.evaluate(cfg, validate=False).predicted.step_time_s
    return predict


# ---------------------------------------------------------------------------------------------- sets
def vtrain_set() -> Set:
    engine, cluster, cache = load_engine("deepspeed"), load_cluster("dgx-a100-80gb"), {}
    cases = []
    with open(REFERENCE / "vtrain_single_node_a100.csv") as f:     # its header line is a comment
        rows = [rec for rec in csv.reader(f) if rec and not rec[0].startswith("#")]
    for *ints, ms in rows:
        g, b, mbs, h, a, L, s, tp, dp, pp = map(int, ints)
        model = gpt(f"gpt-h{h}-l{L}", L, h, a, seq=s)
        training = TrainingSpec(global_batch=b, seq_len=s, precision="fp16", optimizer="adam",
                                overlap_grad_reduce=True)
        cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=mbs, recompute="full")
        cases.append(Case(f"{g} GPUs h{h} L{L} tp{tp} pp{pp} dp{dp} b{b} mbs{mbs}", float(ms) / 1e3,
                          estimate(model, cluster, 1, g, training, engine, cfg, cache)))
    fitted = [("gpu.efficiency.gemm_max", 0.4, 0.95), ("gpu.efficiency.gemm_tile", 0.0, 512.0),
              ("gpu.efficiency.memory", 0.3, 0.95), ("engine.host.per_kernel_s", 1e-6, 200e-6),
              ("engine.host.per_backward_kernel_s", 1e-6, 200e-6), ("intra_node.latency", 1e-6, 60e-6),
              ("engine.host.per_microbatch_s", 1e-5, 10e-3), ("engine.host.recompute_kernel_factor", 0.3, 5.0)]
    return Set("vtrain", cluster, engine, cases, fitted, folds=5)


def korthikanti_set() -> Set:
    engine, cluster, cache = load_engine("megatron"), load_cluster("dgx-a100-80gb"), {}
    cases = []
    for r in read("korthikanti_sp_selective_recompute_results.csv"):
        L, h, a = int(r["num_layers"]), int(r["hidden_size"]), int(r["attention_heads"])
        tp, pp, g, B = int(r["tensor_parallel"]), int(r["pipeline_parallel"]), int(r["num_gpus"]), \
            int(r["global_batch_size"])
        mbs, v = int(r["micro_batch_size"]), int(r["interleave_chunks"])
        model = gpt(r["model"].split()[0], L, h, a)
        training = TrainingSpec(global_batch=B, seq_len=2048, precision="bf16")
        for column, recompute, sp in (("iter_time_full_recompute_s", "full", False),
                                      ("iter_time_present_work_s", "selective", True)):
            cfg = ParallelConfig(tp=tp, pp=pp, dp=1, mbs=mbs, vpp=v, recompute=recompute, sp=sp,
                                 schedule="interleaved" if v > 1 else "1f1b", layers_per_stage=uniform(L, pp * v))
            cases.append(Case(f"{r['model']} {recompute}{' + SP' if sp else ''}", float(r[column]),
                              estimate(model, cluster, g // 8, 8, training, engine, cfg, cache)))
    fitted = [("gpu.efficiency.gemm_max", 0.4, 0.95), ("gpu.efficiency.memory", 0.3, 0.95),
              ("inter_node.efficiency", 0.3, 1.0)]
    return Set("korthikanti", cluster, engine, cases, fitted)


def sc21_ptdp_set() -> Set:
    return sc21_set(zero3=False)


def sc21_zero3_set() -> Set:
    return sc21_set(zero3=True)


def megatron_2021() -> EngineSpec:
    """The megatron engine as Megatron-LM ran in SC21 (v2, spring 2021): before gradient-accumulation fusion, a
    hook added each micro-batch's bf16 weight gradients into the fp32 main_grad buffer
    (megatron/model/distributed.py, main_grad.add_(grad))."""
    engine = load_engine("megatron")
    return engine.model_copy(update={"kernels": engine.kernels.model_copy(update={"grad_accumulation": "hook"})})


def sc21_set(zero3: bool) -> Set:
    """Megatron SC21 Table 2's rows of one scheme: PTD-P (Megatron-LM) or ZeRO-3 (DeepSpeed)."""
    cluster, cache = load_cluster("dgx-a100-80gb"), {}
    megatron, deepspeed = megatron_2021(), load_engine("deepspeed")
    models = {"174.6": gpt("gpt3-175b", 96, 12288, 96), "529.6": gpt("mt-nlg-530b", 105, 20480, 128)}
    pp_of = {"174.6": 12, "529.6": 35}
    cases = []
    for r in read("megatron_sc21_table2_zero3_vs_ptd.csv"):
        if r["scheme"].startswith("ZeRO") != zero3:
            continue
        model, g, B, mbs = models[r["params_billion"]], int(r["num_gpus"]), int(r["global_batch_size"]), \
            int(r["micro_batch_size"])
        if r["scheme"].startswith("ZeRO"):
            engine = deepspeed
            training = TrainingSpec(global_batch=B, seq_len=2048, precision="fp16", optimizer="adam")
            cfg = ParallelConfig(tp=1, pp=1, dp=g, mbs=mbs, zero=3, recompute="full")
        else:
            engine = megatron
            training = TrainingSpec(global_batch=B, seq_len=2048, precision="bf16", optimizer="adam",
                                    overlap_grad_reduce=False)
            pp = pp_of[r["params_billion"]]
            cfg = ParallelConfig(tp=8, pp=pp, dp=g // (8 * pp), mbs=mbs, recompute="full",
                                 layers_per_stage=uniform(model.num_layers, pp))
        flops = model_flops_per_step(model, B, 2048) * 4 / 3        # Megatron counts the recompute forward
        step = flops / (float(r["achieved_tflops_per_gpu"]) * 1e12 * g)
        cases.append(Case(f"{r['scheme']} {r['params_billion']}B {g} GPUs", step,
                          estimate(model, cluster, g // 8, 8, training, engine, cfg, cache)))
    fitted = ([("engine.overlap.gather_window", 0.0, 1.0), ("overlap_slowdown", 0.0, 1.0),
               ("inter_node.efficiency", 0.3, 1.0)] if zero3 else
              [("inter_node.efficiency", 0.3, 1.0), ("overlap_slowdown", 0.0, 1.0)])
    return Set("sc21-zero3" if zero3 else "sc21-ptdp", cluster, deepspeed if zero3 else megatron, cases, fitted)


def llama3_set() -> Set:
    engine, cluster, cache = load_engine("torchtitan"), load_cluster("dgx-h100"), {}
    model = PRESETS["llama3-405b"]
    cases = []
    for r in read("llama3_405b_parallelism_table4.csv"):
        if int(r["context_parallel"]) > 1:
            continue
        g, tp, pp, dp, s = (int(r[k]) for k in ("num_gpus", "tensor_parallel", "pipeline_parallel",
                                                "data_parallel_fsdp", "seq_len"))
        B = int(r["batch_size_per_dp"]) * dp
        training = TrainingSpec(global_batch=B, seq_len=s, precision="bf16")
        c = cluster.resized(g // 8, 8)
        cost = CostModel(model, c, training, engine=engine)
        # "we could pre-train Llama 3 on sequences of 8K tokens without activation checkpointing" (Sec. 3.3.2):
        # no recompute; the virtual stages are not published, so the fastest is taken (memory not judged: see
        # the set's note in the README)
        cfg = min((ParallelConfig(tp=tp, pp=pp, dp=dp, mbs=1, zero=2, vpp=v, sp=True, recompute="none",
                                  schedule="interleaved") for v in range(2, model.num_layers // pp + 1)),
                  key=lambda k: cost.evaluate(k, validate=False).predicted.step_time_s)
        flops = model_flops_per_step(model, B, s)
        step = flops / (float(r["tflops_per_gpu"]) * 1e12 * g)
        cases.append(Case(f"405B {g} GPUs tp{tp} pp{pp} dp{dp} ({cfg.short()})", step,
                          estimate(model, cluster, g // 8, 8, training, engine, cfg, cache)))
    fitted = [("gpu.efficiency.gemm_max", 0.4, 0.95)]
    return Set("llama3-405b", cluster, engine, cases, fitted, hopper=True)


def h200_set() -> Set:
    engine, cluster = load_engine("meshplan"), load_cluster("hgx-h200").resized(1, 1)
    training = TrainingSpec(global_batch=1, seq_len=2048, precision="bf16")
    cases = []
    for r in read("h200_gpt_layer_times.csv"):
        h, a, s, mbs, tp = (int(r[k]) for k in ("hidden", "heads", "seq", "mbs", "tp"))
        model = ModelSpec(name=f"gpt-h{h}", num_layers=1, hidden_size=h, num_heads=a, vocab_size=50304,
                          max_position_embeddings=s, dropout=0.0, attention_kernel="flash")
        t = training.model_copy(update={"seq_len": s})

        def predict(c, model=model, t=t, tp=tp, mbs=mbs, s=s) -> float:
            # one block timed alone (CUDA events from an idle device), the kernels of a TP shard without its
            # collectives (none ran), pure bf16 as measured
            cost = CostModel(model, c, t, engine=engine)
            work = block_work(model, mbs, s, tp, False, "none", cost.dtypes(3, 2), cost.opts)
            return sum(isolated_pass_time(p, cost.gpu, "bf16", host, cost.opts.gemm_scale)
                       for p, host in ((work.forward, cost.host_fwd), (work.backward, cost.host_bwd)))
        cases.append(Case(f"h{h} s{s} mbs{mbs} tp{tp}", (float(r["fwd_ms"]) + float(r["bwd_ms"])) / 1e3, predict))
    fitted = [("gpu.efficiency.flash_attention", 0.2, 0.9), ("gpu.efficiency.gemm_backward", 0.5, 1.0),
              ("gpu.efficiency.attention_tile", 10.0, 5000.0), ("engine.host.per_kernel_s", 1e-6, 100e-6),
              ("engine.host.per_backward_kernel_s", 1e-6, 100e-6)]
    return Set("h200-blocks", cluster, engine, cases, fitted, hopper=True)


SETS = {"vtrain": vtrain_set, "korthikanti": korthikanti_set, "sc21-ptdp": sc21_ptdp_set,
        "sc21-zero3": sc21_zero3_set, "llama3-405b": llama3_set,
        "h200-blocks": h200_set}


# ---------------------------------------------------------------------------------------------- evaluation
def predict(cases: list[Case], cluster: ClusterSpec) -> np.ndarray:
    return np.array([c.predict(cluster) for c in cases])


def calibrated(st: Set, train: list[Case]) -> ClusterSpec:
    params = st.fitted[:max(1, min(len(st.fitted), len(train) - 1))]
    values = fit(st.cluster, params, [c.measured_s for c in train], lambda c: predict(train, c), st.engine)
    return with_params(st.cluster, values, st.engine.name)


def cross_validated(st: Set) -> np.ndarray:
    n = len(st.cases)
    folds = st.folds or n
    out = np.zeros(n)
    for k in range(folds):
        test = [i for i in range(n) if i % folds == k]
        train = [c for i, c in enumerate(st.cases) if i % folds != k]
        if not train:
            return np.full(n, np.nan)
        fitted = calibrated(st, train)
        out[test] = predict([st.cases[i] for i in test], fitted)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=list(SETS), action="append", help="only these sets (repeatable)")
    ap.add_argument("--rows", action="store_true", help="print every row")
    ap.add_argument("--no-cv", action="store_true", help="skip the cross-validated calibration (fast)")
    args = ap.parse_args()
    print(f"{'set':<13}{'rows':>5}{'MAPE %':>8}{'signed %':>10}{'Spearman':>10}{'CV MAPE %':>11}  target")
    for name in args.set or SETS:
        st = SETS[name]()
        meas = np.array([c.measured_s for c in st.cases])
        pred = predict(st.cases, st.cluster)
        err = pred / meas - 1
        rho = spearmanr(pred, meas).statistic if len(st.cases) > 2 else float("nan")
        cv = "" if args.no_cv else f"{np.mean(np.abs(cross_validated(st) / meas - 1)) * 100:>11.2f}"
        target = "<= 15% (Hopper)" if st.hopper else "<= 10%"
        print(f"{st.name:<13}{len(st.cases):>5}{np.mean(np.abs(err)) * 100:>8.2f}{np.mean(err) * 100:>+10.2f}"
              f"{rho:>10.3f}{cv:>11}  {target}; CV <= 5%", flush=True)
        if args.rows:
            for c, p in zip(st.cases, pred):
                print(f"    {c.label:<60} measured {c.measured_s:9.4f} s  predicted {p:9.4f} s  "
                      f"{p / c.measured_s - 1:+7.1%}")


if __name__ == "__main__":
    main()
