# Two commands for a fresh machine: `make run` and `make test`. Both create the virtual environment from
# the lock file first when it is missing or older than the lock file, and are safe to repeat.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A registry or mirror that drops a connection on a fresh CI clone should cost a retry, not the run.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --retries 10 --timeout 60
# env, not a bare VAR=value: after an empty $sudo (as root) the shell would run the assignment as a command.
APT_GET := env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5
export KEDRO_DISABLE_TELEMETRY := 1
export PYTHONDONTWRITEBYTECODE := 1
# CI may start with no locale; progress bars and Kedro's rich logs print UTF-8.
export PYTHONIOENCODING := utf-8
export PYTHONUTF8 := 1

.PHONY: install system-packages run test lint lock viz viz-screenshot clean-data

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# torch first and alone: the pinned version resolves to the local CPU wheel here and to the CUDA
	# build on a GPU machine; installed later it would drag in several GB of CUDA packages.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -r requirements.lock
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	# What the environment was installed from: every run records it beside the checkout's lock hash.
	sha256sum requirements.lock | cut -d' ' -f1 > $@

install: $(VENV)/.installed

run: install
	$(BIN)/kedro run

# Debian packages the tests need: chromium (kedro-viz render check), slurm-wlm and munge (the local SLURM
# cluster of tests/slurm). Only missing ones are installed; needs root or sudo, like any apt-get.
SYSTEM_PACKAGES := chromium slurm-wlm munge
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo $(APT_GET) update -qq && \
		$$sudo $(APT_GET) install -y -qq $$missing >/dev/null; \
	fi

test: install system-packages
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

# Static kedro-viz lineage site in build/ (git-ignored), with previews of the latest data versions;
# browse it with `python3 -m http.server -d build` (the page fetches api/*, which file:// blocks).
viz: install
	rm -rf build
	$(BIN)/kedro viz build --include-previews
	@# kedro-viz 12.5 exits 0 even when the build fails; index.html is written last.
	@test -s build/index.html || { echo "make viz: kedro viz build failed (see above)" >&2; exit 1; }

# docs/kedro-viz-lineage.png: the default pipeline view in headless Chromium (apt-get install chromium).
viz-screenshot: viz
	$(BIN)/python scripts/screenshot_viz.py build docs/kedro-viz-lineage.png

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
