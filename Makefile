# Two commands do all set-up on a fresh machine:
#   make demo   – install, fetch the demo model, train → merge → ONNX (both modes) → parity, summary
#   make test   – install, fetch the demo model, run the test suite (what CI runs)
# Every variable can be set on the command line (make test VENV=.venv-new OPTIMUM_VENV=...).
PYTHON ?= python3
# The main environment: transformers 5.x, ONNX Runtime and ONNX Runtime GenAI's model builder (the decoder
# graphs), training, the server, the dev tools; no optimum.
VENV   := .venv
BIN    := $(VENV)/bin
# optimum's environment: optimum-onnx (the `onnx` extra: its 0.1 release caps transformers below 4.58) on the
# oldest transformers we support, for what only optimum exports (encoders, decoders the builder lacks, the
# engine's optimum slot graphs; tests marked `optimum`) and the core suite under that transformers.
OPTIMUM_VENV := .venv-optimum
OPTIMUM_BIN  := $(OPTIMUM_VENV)/bin
PYTEST := -m pytest -q -p no:cacheprovider
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup native demo test test-all bench llamacpp lint

setup: $(VENV)/.installed native

# the native RotatedShardLoRA kernel (npm headers + system g++); never fails: one line says why not
native: $(VENV)/.installed
	$(BIN)/python -m prolora_export.native.build

# Our own pins (the local CPU wheel; the two transformers lines we test), not requirements of the package:
# users keep their torch.
TORCH  := torch==2.13.0
TRANSFORMERS := transformers>=5,<6
OLDEST_TRANSFORMERS := transformers==4.57.*
# The core suite, run again under the oldest transformers (the builder's tests among them skip there but
# for their checks of versions, architectures and one-line refusals).
CORE_TESTS := tests/test_api.py tests/test_cli_core.py tests/test_convert.py tests/test_data.py \
	tests/test_formats.py tests/test_interrupt.py tests/test_layer.py tests/test_merge.py \
	tests/test_outputs.py tests/test_shards.py tests/test_train.py tests/test_graph_builder.py tests/test_parity_builder.py \
	tests/test_engine_builder.py tests/test_graph_packed.py tests/test_graph_architectures.py \
	tests/test_parity_builder_quantized.py tests/test_builder_fp16.py tests/test_genai_kernel.py tests/test_builder_consumers.py

# --clear: a venv of another layout (say optimum beside transformers 5) is rebuilt, not patched
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[builder,dev]' '$(TRANSFORMERS)'
	touch $@

$(OPTIMUM_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv --clear $(OPTIMUM_VENV)
	$(OPTIMUM_BIN)/python -m pip install -q --upgrade pip
	$(OPTIMUM_BIN)/python -m pip install -q $(TORCH)
	$(OPTIMUM_BIN)/python -m pip install -q -e '.[onnx,dev]' '$(OLDEST_TRANSFORMERS)'
	touch $@

demo: setup
	$(BIN)/python tools/run_demo.py

# The whole suite in the main environment (tests marked `optimum` deselected), then in optimum's: the tests
# marked `optimum`, and the core suite under the oldest transformers. test-all adds the `slow` ones.
test: ONLY := not slow and
test-all: ONLY :=
test test-all: setup $(OPTIMUM_VENV)/.installed
	$(BIN)/prolora-export fetch-demo
	$(BIN)/python $(PYTEST) -m "$(ONLY) not optimum"
	$(OPTIMUM_BIN)/python $(PYTEST) -m "$(ONLY) optimum"
	$(OPTIMUM_BIN)/python $(PYTEST) -m "$(ONLY) not optimum" $(CORE_TESTS)

# the bench exports optimum's graphs (today's) with optimum's venv (bench/envs.py)
bench: setup $(OPTIMUM_VENV)/.installed
	$(BIN)/python bench/run.py --quick

# llama.cpp for bench/bench_llamacpp.py, built from the llama-cpp-python sdist into ~/.cache (~15 min on 2 cores)
llamacpp: setup
	$(BIN)/python bench/bench_llamacpp.py --build-only

lint: setup
	$(BIN)/ruff check .
