# Two commands for a newcomer: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test test-reliability lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## The daemon against the built-in sandbox (SQLite in data/demo.db); Ctrl-C stops both.
run: install
	PYTHON=$(PY) scripts/demo

## Lint, type-check, then every test (PostgreSQL tests skip unless its server is reachable).
test: install lint
	$(PY) -m pytest

## The full reliability sets (every kill point, every fault, long hypothesis runs); counts
## land in build/reliability.json for the README's Reliability table.
test-reliability: install
	rm -f build/reliability.json
	SYNCD_RELIABILITY_REPORT=build/reliability.json \
		$(PY) -m pytest -m "reliability or not reliability" tests/reliability
	@cat build/reliability.json

lint: install
	$(VENV)/bin/ruff check syncd tests migrations
	$(VENV)/bin/ruff format --check syncd tests migrations
	$(VENV)/bin/mypy syncd

format: install
	$(VENV)/bin/ruff format syncd tests migrations
	$(VENV)/bin/ruff check --fix syncd tests migrations

## Benchmarks against the physical limits (issue 7); not part of `make test`.
## Results in tests/bench/results/; Katapult pacing runs its simulator in its own process.
bench: install
	$(PY) -m tests.bench.run
	$(PY) -m tests.bench.katapult_pacing

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
