# `make train` / `make test` work on a fresh machine: they install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION := 2.13.0
export PYTHONHASHSEED := 0

.PHONY: help install train test test-full lint clean bench

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

.setup-stamp: pyproject.toml
	@# torch first (the CPU build on disk) where torch $(TORCH_VERSION) is not installed; pyproject.toml pins torch
	@# 2.13 and its torchvision, so no later dependency moves it (an unpinned torchvision pulled torch's CUDA build)
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	@touch .setup-stamp

install: .setup-stamp  ## install torch (CPU build) first, then vl with dev extras

train: install  ## the default run: pretrain + VQA fine-tune on the embedded corpus (~2 min on 2 CPU cores)
	$(PYTHON) train.py

test: install  ## fast test tier (the README's and CI's test command)
	WANDB_MODE=disabled $(PYTHON) -m pytest -m "not slow" -q

test-full: install  ## every test, slow ones included
	WANDB_MODE=disabled $(PYTHON) -m pytest -q

lint: install  ## ruff + the layer contract (import-linter, pyproject.toml)
	$(PYTHON) -m ruff check vl tests train.py evaluate.py bench
	$(PYTHON) -m ruff format --check vl tests train.py evaluate.py bench
	PYTHONPATH=$(CURDIR) lint-imports --config pyproject.toml

bench: install  ## speed/memory benchmarks (ratios, printed)
	$(PYTHON) bench/run_all.py

clean:  ## remove caches (never outputs/: your runs stay)
	rm -rf .pytest_cache .ruff_cache .setup-stamp build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
