# obsdiff: `make test` and `make run` each set up the environment on their own (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.obsdiff-installed
PYTEST_ARGS ?=

# The tested torch/torchvision pair, installed before the package so that pip never swaps in
# another torch to satisfy torchvision (clean-fid needs torchvision). Override for your CUDA, e.g.
#   make install TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124"
# (add LOCK=none when that torch's own pins conflict with the lock: torch 2.5.1 pins sympy==1.13.1)
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

# The tested environment: every other package pinned in requirements/lock.txt (written by
# `make lock`), which `make install` passes to pip as constraints. LOCK=none installs without it,
# in a fresh .venv: the newest versions pyproject.toml's ranges allow, e.g. `make test LOCK=none`.
LOCK_FILE := requirements/lock.txt
LOCK ?= $(LOCK_FILE)
LOCK_DEP := $(filter-out none,$(LOCK))
LOCK_ARGS := $(if $(LOCK_DEP),-c $(LOCK_DEP))
# The stamp records how .venv was installed; another LOCK than the recorded one reinstalls.
INSTALL_MODE := lock=$(or $(LOCK_DEP),none)
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(INSTALL_MODE))
STAMP_FORCE := FORCE
endif

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help install lock check-lock imagereward-env train-toy bench-quality bench-recover bench-compress bench-quantize bench-baselines bench-token-cap run sample test test-fast test-all test-gpu gpu-check lint format typecheck docs docs-serve bench-kernels bench-prune bench-speed bench-sharded clean clean-outputs FORCE

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

# (Re)create the virtual environment when it is missing, broken, older than pyproject.toml or the
# lock, or installed with another LOCK. Switching to LOCK=none starts from a fresh venv, since pip
# keeps the installed versions that still satisfy the ranges.
$(STAMP): pyproject.toml Makefile $(LOCK_DEP) $(STAMP_FORCE)
	@if [ -z "$(LOCK_DEP)" ] && [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" != "$(INSTALL_MODE)" ]; then \
		echo ">> LOCK=none: removing $(VENV) (installed with $$(cat $(STAMP)))"; \
		rm -rf $(VENV); \
	fi
	@if ! $(PY) -c "import sys" >/dev/null 2>&1; then \
		echo ">> creating $(VENV) with $$($(PYTHON) --version)"; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet $(LOCK_ARGS) -e '.[dev]'
	@echo '$(INSTALL_MODE)' > $(STAMP)
	@echo ">> environment ready: $(VENV) ($(if $(LOCK_DEP),locked by $(LOCK_DEP),LOCK=none: newest versions))"

FORCE:

install: $(STAMP) ## create or update .venv (dev extras) pinned by requirements/lock.txt; LOCK=none: unpinned

lock: ## rewrite requirements/lock.txt: the newest versions the ranges allow, in a fresh temporary venv
	@set -euo pipefail; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo ">> fresh venv in $$tmp with $$($(PYTHON) --version), no constraints"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	start=$$SECONDS; \
	"$$tmp/venv/bin/python" -m pip install --quiet $(TORCH_SPEC); \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[dev]'; \
	echo ">> installed in $$((SECONDS - start)) s"; \
	"$$tmp/venv/bin/python" -m pip freeze >"$$tmp/freeze.txt"; \
	"$$tmp/venv/bin/python" requirements/check_lock.py --write "$$tmp/freeze.txt" \
		--lock $(LOCK_FILE) --torch-spec "$(TORCH_SPEC)"

check-lock: ## check that .venv has every locked package at exactly its locked version
	@test -x $(PY) || { echo "check-lock: no $(VENV) yet (make install)" >&2; exit 1; }
	@$(PY) requirements/check_lock.py --lock $(or $(LOCK_DEP),$(LOCK_FILE)) || { \
		echo "check-lock: to reinstall with the lock: rm $(STAMP) && make install" >&2; exit 1; }

run: $(STAMP) ## the main job: prune the toy model (OBS-Diff 50%), evaluate dense and pruned
	$(PY) -m obsdiff.run

sample: $(STAMP) ## sample every tiny pipeline once (images, grid, record per model)
	$(PY) -m obsdiff.sample --multirun 'model=glob(tiny_*)'

# pytest-xdist: a worker per core (`-n auto`); tests that share an expensive module fixture carry
# one xdist_group, so the fixture is made once (`--dist loadgroup`).
XDIST := -n auto --dist loadgroup

test: $(STAMP) ## run every test tier except gpu (offline, W&B disabled), on every core
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest $(XDIST) -m "not gpu" $(PYTEST_ARGS)

# Every `unit` test wherever it lives: tests/unit, the config composition tests in tests/configs,
# the sharding test in tests/integration.
test-fast: $(STAMP) ## the fast tier: only the unit tests, config composition included (~15 s)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest $(XDIST) -m unit $(PYTEST_ARGS)

test-all: $(STAMP) ## run every tier, gpu included (gpu tests skip themselves without CUDA)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-gpu: $(STAMP) ## run only the gpu tier
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP) ## check style and lint (ruff) and the import layers (import-linter), no changes made
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP) ## fix style and lint where ruff can
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP) ## static types (mypy) on the package
	$(VENV)/bin/mypy

docs: $(STAMP) ## build the manual (docs/, mkdocs.yml) into site/; a broken link or reference fails
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP) ## serve the manual on http://127.0.0.1:8000 while you edit it
	$(VENV)/bin/mkdocs serve

imagereward-env: ## ImageReward's own environment (.venv-imagereward: transformers 4.55, ~3 min, 6 GB)
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" IMAGEREWARD_VENV=.venv-imagereward bash experiments/imagereward_env.sh

train-toy: $(STAMP) ## re-train the toy pipeline from scratch (CPU, ~45 min) into obsdiff/data/toy
	$(PY) -m obsdiff.toy.train
	$(PY) -m obsdiff.toy.train_classifier

bench-quality: $(STAMP) ## the toy quality benchmark (every paper claim on the toy; about 2 h) and its claims table
	$(PY) experiments/reproduce.py toy_ --out outputs/toy_quality --reports experiments/toy_quality
	$(PY) experiments/toy_claims.py outputs/toy_quality --out experiments/toy_quality/claims.md

bench-recover: $(STAMP) ## recovery on the toy: 6 one-shot prunes before and after 2 budgets, paired (about 1.5 h), claims rows; Lightning's overhead
	$(PY) experiments/bench_recover.py

bench-compress: $(STAMP) ## compression on the toy: low-rank modulation, OBS-Diff with it, depth with and without recovery (about 45 min), summary
	$(PY) experiments/bench_compress.py

bench-quantize: $(STAMP) ## pruned + int8 (torchao) on the toy, the do-not-compress list kept and not (about 30 min), summary, claims rows
	$(PY) experiments/bench_quantize.py

bench-baselines: $(STAMP) ## Diff-Pruning, EcoDiff, importance-weighted OBS vs OBS-Diff, L1, Wanda on the toy (about 1.5 h), summary, claims rows
	$(PY) experiments/bench_baselines.py

bench-token-cap: $(STAMP) ## calibration.max_tokens on the tiny video model: how the pruned weights change with the cap (~15 s)
	$(PY) experiments/bench_token_cap.py > experiments/video/token_cap.md

bench-kernels: $(STAMP) ## OBS on one SD3-Medium block vs a straightforward SparseGPT chain (CPU, ~1 min)
	$(PY) experiments/bench_kernels.py

gpu-check: $(STAMP) ## on a CUDA machine: the gpu tier and the paper-setting SD3-Medium benchmark
	PY=$(PY) experiments/gpu_check.sh

bench-speed: $(STAMP) ## inference speed: an SD3.5-Large block (Table 5), the toy, full-size SD3-Medium; eager and compiled
	$(PY) experiments/bench_speed.py

bench-sharded: $(STAMP) ## the solve of 2 full-width SD3-Medium blocks by 1 process, 2 sharing it, 2 repeating it (CPU, ~8 min)
	$(PY) experiments/bench_sharded_solve.py --blocks 2 --repeats 3

bench-prune: $(STAMP) ## calibration hook overhead, then a full-size random SD3-Medium pruned end to end
	$(PY) experiments/bench_prune.py overhead
	$(PY) experiments/bench_prune.py sd3-medium

clean: ## remove caches and build artefacts (keeps .venv and outputs/)
	rm -rf build dist site *.egg-info .pytest_cache .ruff_cache .mypy_cache .grimp_cache .import_linter_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-outputs: ## remove every run under outputs/ (keeps its README)
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
