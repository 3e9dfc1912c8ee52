"""Trace the memory timeline of a few tiny training configurations on CPU and print it as markdown tables
(docs/memory_timeline.md quotes this output).

Each table is one rank's second (steady) step: per phase, the live tensor bytes at the phase's peak split by
category (profiler.memory_trace), in KiB. `--json FILE` also writes every rank's full records.

    .venv/bin/python scripts/memory_timeline.py [--json timeline.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.memory_trace import launch_traces, trace_in_process  # noqa: E402
from profiler.storage_ledger import CATEGORIES  # noqa: E402
from tests.runtime_helpers import make_test_plan, model_spec  # noqa: E402

SPEC = model_spec("gpt-tiny", {"tied_embeddings": False})
BATCH, SEQ = 8, 32
SHORT = {"parameters": "params", "parameter_copies": "param copies", "buffers": "buffers", "gradients": "grads",
         "gradient_buffers": "grad buffers", "optimizer_states": "opt states", "pipeline_buffers": "pipe buffers",
         "saved_activations": "saved acts", "temporaries": "temps"}

ONE_RANK = [
    ("1 rank, fp32, 1 micro-batch of 8, AdamW for-loop (CPU default)", {"mbs": 8}, {}),
    ("1 rank, fp32, 1 sequence per step, AdamW foreach", {"mbs": 1, "batch": 1}, {"foreach": True}),
    ("1 rank, llama-tiny (RMSNorm, RoPE, GQA, SwiGLU), fp32, 1 micro-batch of 8", {"mbs": 8, "model": "llama-tiny"},
     {}),
    ("1 rank, fp32, 1 micro-batch of 8, AdamW foreach (CUDA default)", {"mbs": 8}, {"foreach": True}),
    ("1 rank, fp32, 2 micro-batches of 4", {"mbs": 4}, {}),
    ("1 rank, fp32, recompute full", {"mbs": 8, "recompute": "full"}, {}),
    ("1 rank, amp-bf16 (autocast over fp32 parameters)", {"mbs": 8, "precision": "bf16"}, {"cuda_precision": True}),
]
TWO_RANKS = [
    ("dp 2, ZeRO 0 (FSDP2 replicate), 2 micro-batches of 2", {"dp": 2, "zero": 0, "mbs": 2}, {}),
    ("dp 2, ZeRO 1, 2 micro-batches of 2", {"dp": 2, "zero": 1, "mbs": 2}, {}),
    ("dp 2, ZeRO 2", {"dp": 2, "zero": 2, "mbs": 2}, {}),
    ("dp 2, ZeRO 3", {"dp": 2, "zero": 3, "mbs": 2}, {}),
    ("dp 2, ZeRO 3, bf16 (FSDP2 MixedPrecisionPolicy(bf16, reduce fp32))", {"dp": 2, "zero": 3, "mbs": 2,
                                                                              "precision": "bf16"},
     {"cuda_precision": True}),
    ("tp 2 (Megatron split, no sequence parallelism), 2 micro-batches of 4", {"tp": 2, "mbs": 4}, {}),
    ("pp 2, 1F1B, 4 micro-batches of 2", {"pp": 2, "mbs": 2}, {}),
    ("pp 2, GPipe, 4 micro-batches of 2", {"pp": 2, "mbs": 2, "schedule": "gpipe"}, {}),
]
FOUR_RANKS = [
    ("pp 2 x dp 2, ZeRO 1, 1F1B, 2 micro-batches of 2", {"pp": 2, "dp": 2, "zero": 1, "mbs": 2}, {}),
    ("pp 2 x dp 2, ZeRO 3, 1F1B, 2 micro-batches of 2", {"pp": 2, "dp": 2, "zero": 3, "mbs": 2}, {}),
]


def plan_of(config: dict):
    config = dict(config)
    precision = config.pop("precision", "fp32")
    spec = model_spec(config.pop("model")) if "model" in config else SPEC
    return make_test_plan(spec, config.pop("batch", BATCH), SEQ, precision=precision, **config)


def kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def table(title: str, result: dict, step: int = 2) -> str:
    rows = [r for r in result["records"] if r["step"] == step]
    cats = [c for c in CATEGORIES if any(r["by_category"][c] for r in rows)]
    coords = result["coords"]
    head = (f"**{title}** — rank {result['rank']} (pp {coords['pp']}, dp {coords['dp']}), "
            f"{result['precision_run']}, {result['optimizer']} {result['optimizer_impl']}, step {step}; KiB\n\n")
    lines = ["| phase | mb | peak | " + " | ".join(SHORT[c] for c in cats) + " |",
             "|---|---|---:|" + "---:|" * len(cats)]
    peak = max(rows, key=lambda r: r["peak_bytes"])
    for r in rows:
        mark = " **(step peak)**" if r is peak else ""
        mb = "" if r["microbatch"] is None else str(r["microbatch"])
        lines.append(f"| {r['phase']}{mark} | {mb} | {kib(r['peak_bytes'])} | "
                     + " | ".join(kib(r["by_category"][c]) for c in cats) + " |")
    opt = next(r for r in rows if r["phase"] == "optimizer")
    tail = (f"\nOptimizer's own temporaries: {kib(opt['own_temporaries_max'])} KiB. "
            f"Largest temporaries at the step peak: "
            + ", ".join(f"{t['op'] or 'input'} {t['dtype']}{t['shape']} {kib(t['bytes'])}"
                        for t in next(r for r in rows if r is peak)["top_temporaries"][:3]) + ".\n")
    return head + "\n".join(lines) + "\n" + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="Write every rank's records to this file.")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for title, config, options in ONE_RANK:
        results[title] = [trace_in_process(plan_of(config), steps=2, **options)]
    for group, nproc in ((TWO_RANKS, 2), (FOUR_RANKS, 4)):
        jobs = [{"name": title, "plan": plan_of(config), "steps": 2, **options} for title, config, options in group]
        results.update(launch_traces(jobs, nproc))
    for title, ranks in results.items():
        shown = [r for r in ranks if r["coords"]["dp"] == 0 and r["coords"]["tp"] == 0]   # one rank per stage
        for result in shown:
            print(table(title, result))
    print(f"(traced in {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
