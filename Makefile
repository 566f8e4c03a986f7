# Two commands do all set-up on a fresh machine:
#   make demo   – install, fetch the demo model, train → merge → ONNX (both modes) → parity, summary
#   make test   – install, fetch the demo model, run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup native demo test test-all bench llamacpp lint

setup: $(VENV)/.installed native

# the native RotatedShardLoRA kernel (npm headers + system g++); never fails: one line says why not
native: $(VENV)/.installed
	$(BIN)/python -m prolora_export.native.build

# Our own pin (the local CPU wheel), not a requirement of the package: users keep their torch.
TORCH  := torch==2.13.0
# The core commands also run on the newest transformers 5.x: a second venv without optimum-onnx
# (it caps transformers below 4.58) runs the tests that don't need it, and the builder-graph tests
# (ONNX Runtime GenAI's model builder needs transformers 5).
TF5    := .venv-tf5
CORE_TESTS := tests/test_api.py tests/test_cli_core.py tests/test_convert.py tests/test_data.py \
	tests/test_formats.py tests/test_interrupt.py tests/test_layer.py tests/test_merge.py \
	tests/test_outputs.py tests/test_shards.py tests/test_train.py tests/test_graph_builder.py tests/test_parity_builder.py \
	tests/test_engine_builder.py tests/test_graph_packed.py tests/test_graph_architectures.py \
	tests/test_parity_builder_quantized.py tests/test_builder_fp16.py tests/test_genai_kernel.py tests/test_builder_consumers.py

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[onnx,dev]'
	touch $@

$(TF5)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(TF5)
	$(TF5)/bin/python -m pip install -q --upgrade pip
	$(TF5)/bin/python -m pip install -q $(TORCH)
	$(TF5)/bin/python -m pip install -q -e '.[train,demo,test,builder]' 'transformers>=5'
	touch $@

demo: setup
	$(BIN)/python tools/run_demo.py

test: setup $(TF5)/.installed
	$(BIN)/prolora-export fetch-demo
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider
	$(TF5)/bin/python -m pytest -m "not slow and not onnx" -q -p no:cacheprovider $(CORE_TESTS)

test-all: setup
	$(BIN)/prolora-export fetch-demo
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python bench/run.py --quick

# llama.cpp for bench/bench_llamacpp.py, built from the llama-cpp-python sdist into ~/.cache (~15 min on 2 cores)
llamacpp: setup
	$(BIN)/python bench/bench_llamacpp.py --build-only

lint: setup
	$(BIN)/ruff check .
