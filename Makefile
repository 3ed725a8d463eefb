# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# FFCV compiles against these; pip has no FFCV wheels.
FFCV_DEBS := pkg-config libopencv-dev libturbojpeg0-dev
# The UI tests look at the MLflow and Prefect UIs through it (they skip without it).
UI_DEBS := chromium
# Real photos for the accuracy figures and the real-data tests (they skip without it): Fashion-MNIST's idx files
# under /usr/share/datasets/fashion-mnist.
DATA_DEBS := dataset-fashion-mnist
STAMP := $(VENV)/.setup-stamp
STAMP_INPUTS := pyproject.toml constraints.txt Makefile
CHECKED := models pipelines flows cli

.PHONY: setup check demo test test-unit test-integration test-gpu bench bench-gpu up down status constraints clean-data help

help:
	@echo "make demo   - the main job end to end on the built-in demo ImageNet (sets up first)"
	@echo "make test   - the checks (ruff, mypy) and the test suite (sets up first)"
	@echo "make check  - ruff (lint, format) and mypy on models/ pipelines/ flows/ cli/, seconds"
	@echo "make test-unit        - tests/unit only: pure code, minutes at most"
	@echo "make test-integration - tests/integration and tests/e2e: real Ray, Prefect, MLflow, FFCV, DALI"
	@echo "make test-gpu         - the tests marked gpu (skipped, saying why, where CUDA is not available)"
	@echo "make bench  - benchmarks; figures go to benchmarks/results/*.json"
	@echo "make bench-gpu - the GPU path measured (benchmarks/gpu.py -> benchmarks/results/gpu.json)"
	@echo "make up     - the local stack: Prefect server + work pool 'effnet' and its worker, MLflow server, Ray head"
	@echo "make down   - stop every process of the stack"
	@echo "make status - what of the stack runs and answers (exit 1 when something does not)"

# A second run only compares a checksum of the inputs with the stamp and returns in seconds.
setup:
	@want=$$(cat $(STAMP_INPUTS) | sha256sum | cut -c1-16); \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$want" ] && $(PY) -c "import models, pipelines, flows, cli" 2>/dev/null; then \
		echo "setup: $(VENV) is up to date"; exit 0; fi; \
	set -e; \
	missing=$$(for p in $(FFCV_DEBS) $(UI_DEBS) $(DATA_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then echo "setup: installing Debian packages: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else needed=$$(for p in $(FFCV_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
			if [ -n "$$needed" ]; then echo "setup: FFCV needs the Debian packages: $$needed"; \
				echo "       run: sudo apt-get install -y $$missing   (then make setup again)"; exit 1; fi; \
			echo "setup: without $(UI_DEBS) $(DATA_DEBS) the UI and real-data tests skip (sudo apt-get install -y $(UI_DEBS) $(DATA_DEBS))"; fi; fi; \
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	$(PIP) install -q --upgrade pip wheel setuptools; \
	echo "setup: installing torch $(TORCH_VERSION) first, so the project's torch range is already met"; \
	$(PIP) install -q torch==$(TORCH_VERSION); \
	echo "setup: installing the project with the pinned versions in constraints.txt (FFCV builds from source)"; \
	$(PIP) install -q -c constraints.txt -e '.[dali,ffcv,test]'; \
	echo "$$want" > $(STAMP); echo "setup: done"

demo: setup
	$(VENV)/bin/effnet demo

# Seconds, before the suite: lint, format and types of the code (configured in pyproject.toml).
check: setup
	$(VENV)/bin/ruff check $(CHECKED)
	$(VENV)/bin/ruff format --check $(CHECKED)
	$(VENV)/bin/mypy $(CHECKED)

test: setup check
	$(PY) -m pytest

# The folder decides the tier (tests/conftest.py): these two split the suite, each test in exactly one.
test-unit: setup
	$(PY) -m pytest -m unit

test-integration: setup
	$(PY) -m pytest -m "integration or e2e"

# On a CUDA machine: bf16 autocast, channels_last and device-side preprocessing for real.
test-gpu: setup
	$(PY) -m pytest -m gpu

# Every script in benchmarks/ but the two files of the package they share (benchmarks.common).
# benchmarks/gpu.py is `make bench-gpu`: the GPU path, for a CUDA machine (without one it says what it skipped).
BENCHMARKS := $(sort $(filter-out benchmarks/__init__.py benchmarks/common.py benchmarks/gpu.py,$(wildcard benchmarks/*.py)))

bench: setup
	@for b in $(BENCHMARKS); do echo "== $$b"; $(PY) $$b || exit 1; done

bench-gpu: setup
	$(PY) benchmarks/gpu.py

# The local stack on 127.0.0.1, state under the data directory (infra/README.md).
up: setup
	infra/local-stack.sh start

down: setup
	infra/local-stack.sh stop

status: setup
	infra/local-stack.sh status

# Regenerate the pins after changing dependencies (run in a fresh venv made by `make setup`).
constraints:
	@{ echo "# Exact versions a fresh machine resolves (pip install -c constraints.txt). Regenerate: make constraints"; \
	  $(PIP) freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > constraints.txt

clean-data:
	rm -rf data
