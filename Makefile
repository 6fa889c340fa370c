# Quick start: `make run` serves with the embedded defaults; `make test` runs every check.
# Both build .venv/ first when it is missing or stale.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A second interpreter for the unit tests (`make unit-py312`, not part of `make test`): asyncio
# changed under us between 3.11 and 3.12 once already (Hierarchy.quiesce spun on 3.12 only).
# Heavy: the only torch 2.13 wheel for 3.12 on PyPI is the CUDA build (about 5 GB installed).
PY312 ?= $(firstword $(foreach p,$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12 2>/dev/null),$(shell $(p) -c "print(1)" >/dev/null 2>&1 && echo $(p))))
VENV312 := .venv312

.PHONY: run test lint typecheck unit unit-py312 setup system-deps bench clean

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

unit-py312:
	@if [ -z "$(PY312)" ]; then echo "unit-py312: no python3.12 on this machine; skipped"; else \
	  set -e; test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312); \
	  $(VENV312)/bin/python -m pip install -q -c constraints.txt -e '.[dev]'; \
	  $(VENV312)/bin/python -m pytest -q -ra -p no:cacheprovider; fi

test: $(STAMP) system-deps lint typecheck unit

bench: $(STAMP) system-deps
	$(BIN)/python -m loadtest.bench --standard

clean:
	rm -rf $(VENV) $(VENV312) build *.egg-info
