# Two entry points for a fresh machine: `make demo` (set up + run the pipeline on the embedded default, CPU)
# and `make test` (set up + run the test suite). Everything is installed into .venv by these rules.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-dev demo test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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
	$(VENV)/bin/flux2 make-tiny-model --out models/tiny
	$(VENV)/bin/flux2 generate --model_version tiny --dit models/tiny/dit.safetensors \
		--vae models/tiny/ae.safetensors --text_encoder models/tiny/text_encoder \
		--prompt "a red circle on a blue background" --image_size 128 128 --seed 0 --save_path outputs/demo

test: setup-dev
	$(PY) -m pytest

bench: setup-dev
	$(PY) bench/dit_step.py

clean:
	rm -rf $(VENV) outputs models/tiny
