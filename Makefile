# Two commands do all set-up on a fresh machine:
#   make demo   – install, fetch the demo model, train → merge → ONNX (both modes) → parity, summary
#   make test   – install, fetch the demo model, run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup native demo test test-all bench lint

setup: $(VENV)/.installed native

# the native RotatedShardLoRA kernel (npm headers + system g++); never fails: one line says why not
native: $(VENV)/.installed
	$(BIN)/python -m prolora_export.native.build

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $@

demo: setup
	$(BIN)/python tools/run_demo.py

test: setup
	$(BIN)/prolora-export fetch-demo
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider

test-all: setup
	$(BIN)/prolora-export fetch-demo
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python bench/run.py --quick

lint: setup
	$(BIN)/ruff check .
