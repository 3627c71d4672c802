# hybridat pipelines. Every target is a file, so an interrupted make resumes where it stopped.
#   make demo    the whole chain on real CIFAR-10 at a CPU scale, in minutes
#   make test    the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HYBRIDAT := $(VENV)/bin/hybridat
# torch and torchvision first, pinned to the wheels this machine has; override for another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SHARED_DATA := $(abspath ../shared/data)
export HYBRIDAT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/cifar-10-batches-py),$(SHARED_DATA),$(CURDIR)/data)

.PHONY: install test demo clean-demo
.DELETE_ON_ERROR:

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# ---- demo: ResNet-18 at 1/8 width, 2,000 training images, PGD-3 training, PGD-10 evaluation on 500 images
DEMO ?= demo
DEMO_NORMS ?= bn dual-bn
DEMO_TRAIN ?= --arch resnet18 --width 0.125 --train-subset 2000 --epochs 4 --batch-size 64 --steps 3 --step 3 --lr 0.05
DEMO_EVAL ?= --n 500 --attack clean --attack pgd --steps 10 --batch-size 250

demo: $(DEMO)/summary.txt
	@cat $<

$(DEMO)/%/model.safetensors: | install
	$(HYBRIDAT) train --norm $* $(DEMO_TRAIN) --out $(DEMO)/$* --quiet

$(DEMO)/%/eval.csv: $(DEMO)/%/model.safetensors
	$(HYBRIDAT) attack $< $(DEMO_EVAL) --out $@

$(DEMO)/summary.txt: $(foreach n,$(DEMO_NORMS),$(DEMO)/$(n)/eval.csv)
	$(PY) -m hybridat.summary $^ > $@.tmp && mv $@.tmp $@

clean-demo:
	rm -rf $(DEMO)
