#!/usr/bin/env bash
# Build the engine venv (Megatron-LM's megatron-core, DeepSpeed, torchtitan) at $1: one venv, their dependencies
# agree; kept out of meshplan's .venv. CPU torch first, else pip fetches a CUDA build. megatron-core 0.19.2
# declares Python >= 3.12 but runs on 3.11 with the shim in megatron_check.py; with its dependencies pip would
# build numpy, so they are installed first and it without them. DS_BUILD_OPS=0: no DeepSpeed kernels compiled.
set -euo pipefail
venv="$1"
export PIP_CACHE_DIR="$(dirname "$venv")/pip-cache"    # nothing cached outside the repository
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q numpy "packaging>=24.2" typing_extensions triton
"$venv/bin/pip" install -q --no-deps --ignore-requires-python megatron-core==0.19.2
DS_BUILD_OPS=0 "$venv/bin/pip" install -q deepspeed==0.19.8 torchtitan==0.3.0
touch "$venv/.installed"
