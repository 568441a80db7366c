# vf-lightning: `make demo` (the main job) and `make test`, each setting itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VF := $(VENV)/bin/vf
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1

.PHONY: install data demo fit-demo multitask-demo test check lint typecheck bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' scikit-learn
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$VF_DATA_DIR" ]; then echo "Fashion-MNIST: found"; \
	else echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi

DEMO_OUT := outputs/fmnist_vgg_pair

fit-demo: install data
	@if [ -f $(DEMO_OUT)/net_a.pt ] && [ -f $(DEMO_OUT)/net_b.pt ]; then \
	  echo "reusing trained pair in $(DEMO_OUT) (delete it to retrain)"; \
	else $(VF) fit --config configs/fit/fmnist_vgg_pair.yaml; fi

demo: fit-demo
	$(VF) merge --config configs/merge/fmnist_demo.yaml
	$(VF) prune --config configs/prune/fmnist_demo.yaml

# Non-local multi-task merging of Fashion-MNIST experts (trains foundations and experts when absent).
multitask-demo: install data
	$(PY) -m vf_lightning.multitask.demo

test: install data
	$(PY) -m pytest -q

# test + ruff + mypy (the full pre-merge check)
check: lint typecheck test

lint: install
	$(VENV)/bin/ruff check vf_lightning callbacks tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

bench: fit-demo
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/matching.py --samples 512
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/callbacks.py

clean:
	rm -rf outputs wandb lightning_logs .pytest_cache
