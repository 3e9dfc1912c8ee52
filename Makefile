# meshplan: `make demo` sets up .venv and plans a job; `make test` sets up .venv and the engine venv and runs every
# test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Megatron-LM (megatron-core), DeepSpeed and torchtitan in a venv of their own, whose code checks the exports
# (tests/test_export_engines.py; how it is built: tests/engines/install.sh).
ENGINES       := .engines/venv
ENGINES_STAMP := $(ENGINES)/.installed

.PHONY: setup engines demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m compileall -q planner profiler runtime    # an editable install has no bytecode yet
	touch $(STAMP)

setup: $(STAMP)

$(ENGINES_STAMP): tests/engines/install.sh
	bash tests/engines/install.sh $(ENGINES)

engines: $(ENGINES_STAMP)

demo: $(STAMP)
	$(BIN)/meshplan plan --model gpt3-175b --cluster dgx-a100-80gb --nodes 128 --global-batch 1536 --seq 2048

test: $(STAMP) $(ENGINES_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/accuracy_vtrain.py
	$(BIN)/python scripts/bench_estimate.py
	$(BIN)/python scripts/bench_search.py
	$(BIN)/python scripts/bench_profile_cluster.py
	$(BIN)/python scripts/bench_calibrate.py

clean:
	rm -rf $(VENV) .engines .pytest_cache .hypothesis
