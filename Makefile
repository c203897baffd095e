# Two commands on a fresh machine: `make up` runs the service on the embedded broker, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test lint typecheck check install clean bench compiled

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/censorwatch up

test: $(STAMP)
	bash deploy/scripts/ensure-prometheus.sh || true
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# The optional compiled engine (setup.py): a full build of the project in build/compiled, rebuilt every time so it
# never lags the sources. PYTHONSAFEPATH keeps the source tree from coming before it, in the bench's services too.
compiled: $(STAMP)
	rm -rf build/compiled
	CENSORWATCH_COMPILE=1 $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --target build/compiled .

bench: compiled
	PYTHONSAFEPATH=1 PYTHONPATH=build/compiled $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
