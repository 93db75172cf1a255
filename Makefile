# mailsync — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit imports install test-deps bench bench-quick dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make demo: a host and two stations syncing the sample data over local mailboxes
demo: $(STAMP)
	$(VENV)/bin/mailsync demo mailsync-demo

## make test: installs test servers where missing, then lint, types and the whole suite
test: $(STAMP) test-deps lint typecheck imports unit bench-quick

test-deps:
	bash scripts/install-test-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check mailsync tests samples bench scripts
	$(VENV)/bin/ruff format --check mailsync tests samples bench scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy scripts/check_imports.py

## make imports: import circles and layering rules (scripts/check_imports.py)
imports: $(STAMP)
	$(PY) scripts/check_imports.py

unit: $(STAMP)
	$(PY) -m pytest

## make dist: the wheel a server or laptop installs (pipx install dist/mailsync-*.whl)
dist: $(STAMP)
	rm -rf dist
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .
	@ls dist/*.whl

## make bench: measurements, not part of make test
bench: $(STAMP)
	$(PY) bench/pipeline.py --output docs/benchmarks.md
	$(PY) bench/cycle_cost.py --output docs/benchmarks.md
	$(PY) bench/streaming_memory.py
	$(PY) bench/compression_levels.py
	$(PY) bench/verify.py
	$(PY) bench/profile_steady.py --output docs/benchmarks.md
	$(PY) bench/fanout.py
	$(PY) bench/workers.py --output docs/benchmarks.md

## the benchmarks' quick mode, once per `make test`, so that they never rot
bench-quick: $(STAMP)
	$(PY) bench/pipeline.py --quick > /dev/null
	$(PY) bench/cycle_cost.py --quick > /dev/null
	$(PY) bench/streaming_memory.py --quick > /dev/null
	$(PY) bench/verify.py --quick > /dev/null
	$(PY) bench/profile_steady.py --quick > /dev/null
	$(PY) bench/fanout.py --quick --runs 1 > /dev/null
	$(PY) bench/workers.py --quick > /dev/null

clean:
	rm -rf $(VENV) mailsync-demo dist build .pytest_cache .mypy_cache .ruff_cache
