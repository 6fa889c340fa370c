# Quick start: `make run` serves with the embedded defaults; `make test` runs every check.
# Both build .venv/ first when it is missing or stale.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit setup system-deps bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	@touch $(STAMP)

setup: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

run: $(STAMP)
	$(BIN)/kvgate serve

lint: $(STAMP)
	$(BIN)/ruff check gateway tiers coherence loadtest tests
	$(BIN)/ruff format --check gateway tiers coherence loadtest tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test: $(STAMP) system-deps lint typecheck unit

bench: $(STAMP) system-deps
	$(BIN)/python -m loadtest.bench --standard

clean:
	rm -rf $(VENV) build *.egg-info
