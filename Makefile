# Two commands for a fresh machine: `make run` and `make test`. Both create the virtual environment from
# the lock file first when it is missing or older than the lock file, and are safe to repeat.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export PYTHONDONTWRITEBYTECODE := 1
# CI may start with no locale; progress bars and Kedro's rich logs print UTF-8.
export PYTHONIOENCODING := utf-8
export PYTHONUTF8 := 1

.PHONY: install run test lint lock viz clean-data

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and alone: the pinned version resolves to the local CPU wheel here and to the CUDA
	# build on a GPU machine; installed later it would drag in several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/kedro run

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

# Re-resolve the pins after changing pyproject.toml dependencies (needs the package registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/' > requirements.lock
	rm -rf .lock-venv

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete
