# Two entry points: `make demo` (main job on the bundled default) and `make test` (the test suite).
# Each creates the virtual environment and installs the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: install demo test test-all lint typecheck clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train,serve,dev]"
	touch $@

demo: install
	$(BIN)/python -m jrs.pipeline.demo --out $(DEMO_OUT)

lint: install
	$(BIN)/ruff check jrs training model_export service tests examples research
	$(BIN)/ruff format --check jrs training model_export service tests examples research

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest -q -m "not slow and not gpu" --timeout=900

test-all: install
	$(BIN)/pytest -q --timeout=3600

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
