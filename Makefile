# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the test suite).
# Both create .venv on first use and reuse it afterwards; nothing outside this folder is needed except
# Debian's Fashion-MNIST package, which `make data-deps` installs when it is missing (needs root or sudo).

VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: setup data-deps run test test-slow lint mutation

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data-deps:
	@if [ ! -d $(FMNIST) ]; then \
	  echo "installing Debian's dataset-fashion-mnist into $(FMNIST)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

run: setup data-deps
	dvc repro

test: setup data-deps
	$(PY) -m pytest

test-slow: setup data-deps
	$(PY) -m pytest -m slow

# Mutation testing of the core maths and the resume / chunk logic (pyproject.toml [tool.mutmut]; not part of `make
# test`): one core, resumable (mutants/ keeps the results; `rm -rf mutants` starts over); the score goes to
# benchmarks/results/mutation.json, the surviving mutants' dispositions are benchmarks/results/mutation.md.
MUTATION_JOBS ?= 1
mutation: setup data-deps
	$(PY) -m pip install --quiet -e '.[mutation]'
	env -u PYTHONPATH OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS)
	$(PY) benchmarks/mutation_score.py --out benchmarks/results/mutation.json --label "make mutation"

lint: setup
	$(VENV)/bin/ruff check data diffusion rin meme flows tests benchmarks
	$(VENV)/bin/lint-imports

# Orchestration (README, "Prefect"): the local Prefect server (SQLite in .prefect/), the served deployments, and a
# smoke-scale run of each, triggered the way users do. Only these targets see PREFECT_API_URL (tests start their own).
PREFECT_PORT ?= 4200
PREFECT_TARGETS := prefect-server serve table2-smoke ablation-smoke claims-smoke
.PHONY: $(PREFECT_TARGETS)
$(PREFECT_TARGETS): export PREFECT_API_URL := http://127.0.0.1:$(PREFECT_PORT)/api
$(PREFECT_TARGETS): export PREFECT_HOME := $(abspath .prefect)

prefect-server: setup
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: setup data-deps
	$(PY) -m flows.deploy serve

table2-smoke: setup
	$(PY) -m flows.deploy wait reproduce-table2/smoke
	prefect deployment run 'reproduce-table2/smoke' --watch

ablation-smoke: setup
	$(PY) -m flows.deploy wait ablation/smoke
	prefect deployment run 'ablation/smoke' --watch

claims-smoke: setup
	$(PY) -m flows.deploy wait reproduce-claims/smoke
	prefect deployment run 'reproduce-claims/smoke' --watch
