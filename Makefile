# Two entry points for a fresh machine: `make demo` (set up + run the pipeline on the embedded default, CPU)
# and `make test` (set up + run the test suite). Everything is installed into .venv by these rules.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# DVC stages run `python -m stages.X`: that must be this venv's python.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup setup-dev demo test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a CPU wheel here; a looser range would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev

demo: setup
	dvc repro
	@echo
	@echo "Done. Open outputs/eval/grid.png (base beside LoRA), plots/*.png; metrics in metrics/eval.json;"
	@echo "compare runs with: mlflow ui --backend-store-uri sqlite:///$$PWD/mlflow.db --host 127.0.0.1"

test: setup-dev
	$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder

bench: setup-dev
	$(PY) bench/dit_step.py

clean:
	rm -rf $(VENV) outputs data cache checkpoints metrics plots reports mlflow.db mlartifacts
