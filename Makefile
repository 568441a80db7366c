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

# Multi-task merging on the offline multi-domain task suite (vf_lightning/data/tasksuite.py), non-local then local:
# `vf fit` trains the two foundations and the experts whose checkpoints are absent (delete outputs/multitask/fmnist
# to retrain), then `vf merge` runs configs/merge/fmnist_{nonlocal,local}.yaml (ExpertsModule + TaskMergeCallback).
# Extra merge flags: make multitask-demo MULTITASK_ARGS='--trainer.logger false'
MT_OUT := outputs/multitask/fmnist
MULTITASK_ARGS ?=
# the suite's tasks as task:source:transform:transform_seed:classes (configs/merge/fmnist_*.yaml list the same)
MT_TASKS := perm:fashion_mnist:permute:0:0,1,2,3,4 invert:fashion_mnist:invert:1:5,6,7,8,9 \
  digits:digits:none:2:0,1,2,3,4,5,6,7,8,9 rot:fashion_mnist:rotate:3:0,2,4,6,8 contrast:fashion_mnist:contrast:4:1,3,5,7,9
# the foundation of each task, in MT_TASKS order
MT_NONLOCAL := a a a b b
MT_LOCAL := a a a a a

# $(call mt_experts,SETTING,FIT_CONFIG,FOUNDATIONS_VARIABLE): train the missing experts of SETTING (seed 10 + index),
# each in its own run directory (vf fit refuses a second run in one directory)
define mt_experts
	@i=0; set -- $($(3)); for spec in $(MT_TASKS); do \
	  IFS=: read -r task source transform tseed classes <<< "$$spec"; f=$$1; shift; \
	  out=$(MT_OUT)/$(1)/$$task.pt; seed=$$((10 + i)); i=$$((i + 1)); \
	  if [ -f $$out ]; then echo "reusing $$out"; continue; fi; \
	  echo "training $(1) expert $$task ($$source, $$transform, classes $$classes, foundation $$f) -> $$out"; \
	  $(VF) fit --config configs/fit/$(2).yaml --seed_everything=$$seed --trainer.default_root_dir=$(MT_OUT)/$(1)/$$task \
	    --model.init_args.task=$$task --model.init_args.classes="[$$classes]" --data.init_args.classes="[$$classes]" \
	    --model.init_args.net.num_classes=$$(tr ',' ' ' <<< "$$classes" | wc -w) \
	    --data.init_args.source=$$source --data.init_args.transform=$$transform --data.init_args.transform_seed=$$tseed \
	    --data.init_args.val_samples=$$([ $$source = digits ] && echo 300 || echo 1000) \
	    --model.init_args.foundation=$(MT_OUT)/foundation_$$f/last.ckpt --model.init_args.foundation_name=$$f \
	    --model.init_args.export_path=$$out --model.init_args.seed=$$seed --data.init_args.seed=$$seed || exit 1; \
	done
endef

multitask-demo: install data
	@for f in a b; do \
	  if [ -f $(MT_OUT)/foundation_$$f/last.ckpt ]; then echo "reusing $(MT_OUT)/foundation_$$f/last.ckpt"; \
	  else $(VF) fit --config configs/fit/fmnist_foundation_$$f.yaml || exit 1; fi; \
	done
	$(call mt_experts,nonlocal,fmnist_expert,MT_NONLOCAL)
	$(VF) merge --config configs/merge/fmnist_nonlocal.yaml $(MULTITASK_ARGS)
	$(call mt_experts,local,fmnist_expert_local,MT_LOCAL)
	$(VF) merge --config configs/merge/fmnist_local.yaml $(MULTITASK_ARGS)

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
