#!/usr/bin/env bash
# The GPU checks of issue 8 item 6, as one short script for a lent H200 (the `device` tool runs it in the repo
# root; everything it measures lands in $OUT). About 8-10 minutes; run it once with a timeout that leaves room
# for a rerun, then give the machine back.
#
#   1. profile model: one Llama-3-8B block at tp 1, 2, 4, 8 and micro-batch 1, 2 (seq 4096, bf16);
#   2. profile cluster on this device (GEMM curve, copy bandwidth, kernel overhead, flash attention at head
#      dimensions 128 and 64, the host's seconds per eager kernel and per optimizer parameter tensor, plain
#      and DTensor, into engine_overrides: the engine files' 0 and 20 us are CPU-derived), and the
#      host seconds of FSDP2's hooks per block (scripts/measure_fsdp_host.py --device cuda) and of DTensor TP
#      per block on the host's CPU (scripts/measure_tp_host.py), and whether a GEMM keeps its short-burst rate
#      over seconds of back-to-back work (scripts/measure_sustained_gemm.py);
#   3. 20-step `meshplan run`s of llama3.2-1b and gpt3-1.3b on one GPU, eager and with --compile, and of
#      gpt3-1.3b at micro-batch 1 (launch-bound) without and with full recomputation (what checkpointing costs
#      the host: the engine files' recompute_kernel_factor and checkpoint_forward_s are CPU-measured), each
#      against the plan's prediction (step time, tokens/s, peak allocated and reserved memory).
# Afterwards: fold $OUT/cluster.json's efficiencies into cluster_specs/hgx-h200.yaml (with this script named
# as their source), and calibrate the meshplan engine's host costs on the runs:
#   meshplan calibrate --cluster hgx-h200 --runs $OUT/run_*.json -o h200-calibrated.yaml
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }

if [ ! -x .venv/bin/meshplan ]; then
    log "setting up .venv (torch from the registry: the device machine has a CUDA wheel cache of its own)"
    python3 -m venv .venv && .venv/bin/pip install -q torch && .venv/bin/pip install -q -e '.[test]' || exit 1
fi
M=.venv/bin/meshplan
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.csv"

log "1. profile model llama3-8b block"
timeout 240 $M profile model -m llama3-8b --tp 1,2,4,8 --mbs 1,2 --seq 4096 --precision bf16 \
    --recompute none -o "$OUT/llama8b_profile.json" --force 2>&1 | tail -20 | tee -a "$OUT/gpu_check.log"

log "2. profile cluster (one device)"
timeout 120 $M profile cluster --nproc 1 -o "$OUT/cluster.json" --force 2>&1 | tail -20 | tee -a "$OUT/gpu_check.log"

log "2b. FSDP2 hooks' host seconds per block on this GPU host (engine files' host.fsdp_hooks)"
timeout 90 .venv/bin/python scripts/measure_fsdp_host.py --device cuda --repeats 3 2>&1 | grep -v Warn \
    | tee "$OUT/fsdp_hooks.txt" | tee -a "$OUT/gpu_check.log"

log "2c. DTensor tensor parallelism's host seconds per block on this GPU host's CPU (engine files' host.tp_dtensor)"
timeout 90 .venv/bin/python scripts/measure_tp_host.py --repeats 3 2>&1 | grep -v Warn \
    | tee "$OUT/tp_dtensor.txt" | tee -a "$OUT/gpu_check.log"

log "2d. sustained GEMM rate: a 3 s back-to-back run against a short burst (power and clocks over a whole step)"
timeout 60 .venv/bin/python scripts/measure_sustained_gemm.py --size 8192 --seconds 3 2>&1 \
    | tee "$OUT/sustained_gemm.txt" | tee -a "$OUT/gpu_check.log"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv \
    | tee -a "$OUT/gpu_check.log"

log "3. meshplan run, eager and compiled"
for model in llama3.2-1b gpt3-1.3b; do
    for compile in no-compile compile; do
        name="${model}_${compile}"
        $M estimate -m "$model" -c hgx-h200 --nodes 1 --gpus-per-node 1 -b 8 --seq 2048 --mbs 4 \
            --precision bf16 --"$compile" -o "$OUT/plan_$name.json" --force > /dev/null || continue
        timeout 150 $M run "$OUT/plan_$name.json" --steps 20 --"$compile" --report "$OUT/run_$name.json" --force \
            2>&1 | tail -12 | tee -a "$OUT/gpu_check.log"
    done
done
for recompute in none full; do
    name="gpt3-1.3b_mbs1_${recompute}"
    $M estimate -m gpt3-1.3b -c hgx-h200 --nodes 1 --gpus-per-node 1 -b 8 --seq 2048 --mbs 1 --precision bf16 \
        --recompute "$recompute" -o "$OUT/plan_$name.json" --force > /dev/null || continue
    timeout 150 $M run "$OUT/plan_$name.json" --steps 20 --report "$OUT/run_$name.json" --force \
        2>&1 | tail -12 | tee -a "$OUT/gpu_check.log"
done
log "done"
