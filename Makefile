# Two entry points (see README): `make train` runs the main job, `make test` runs the suite.
# Both create .venv on first use. The venv sees the system's packages, so a machine that already has
# a CUDA build of torch keeps it; elsewhere the CPU build 2.13.0 is installed first (an unpinned torch
# would pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers: the suite takes about 18 minutes on 2 cores with 2 workers, 27 with one process
# (most tests wait on subprocesses or the Triton interpreter); WORKERS=0 runs in one process (for -s, --pdb)
WORKERS ?= 2

.PHONY: train test lint install

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m train $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
