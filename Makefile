# hybridat pipelines. Every target is a file, so an interrupted make resumes where it stopped.
#   make demo    the whole chain on real CIFAR-10 at a CPU scale, in minutes
#   make study   the paper's claims checked over 3 seeds at a CPU scale (Findings in study/report/report.md)
#   make test    the test suite
#   make bench   hybridat's speed, measured against references in one run
#   make data    the venv and CIFAR-10 only
#   make clean-demo  removes what make demo wrote (demo/runs, derived, nsgap, report), nothing else
# Output folders (TABLES, MINI, STUDY, DEMO) are named on the command line (make demo DEMO=demo2), never taken from
# the environment: a DEMO exported for something else would have been written into, and removed by clean-demo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HYBRIDAT := $(VENV)/bin/hybridat
# torch and torchvision first, pinned to the wheels this machine has; override for another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SHARED_DATA := $(abspath ../shared/data)
export HYBRIDAT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/cifar-10-batches-py),$(SHARED_DATA),$(CURDIR)/data)

.PHONY: install data test demo mini study tables bench clean-demo
.DELETE_ON_ERROR:
.SECONDEXPANSION:

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# CIFAR-10, downloaded once before anything reads it: the tests expect it, and trainings started at once by make -j
# each downloaded it into one folder
CIFAR10 := $(HYBRIDAT_DATA_DIR)/cifar-10-batches-py/test_batch
$(CIFAR10): | install
	$(PY) -c 'import sys; from hybridat import HybridatError, load_split; sys.excepthook = lambda t, e, tb: \
	    print(f"error: {e}", file=sys.stderr) if t is HybridatError else sys.__excepthook__(t, e, tb); \
	    load_split("cifar10", True); load_split("cifar10", False)'

# the venv and CIFAR-10 alone: run it once before several makes start at once (a grid split over GPUs, README)
data: install | $(CIFAR10)

test: install | $(CIFAR10)
	$(PY) -m pytest -q

# ---- the paper's grid. A run folder is named NORM_LOSS_EPS_sSEED; everything below derives from the name.
# make tables: paper scale on a GPU (110 epochs, full test set, PGD-10/20, AutoAttack on the first 1,000).
# make mini:   the same grid at a CPU scale.  make study: the Findings' grid, 3 seeds, on a CPU.  make demo: minutes.
SEEDS ?= 0
NORMS_8 := bn bn-mix dual-bn dual-ap dual-ns cross-bn cross-bn-adv dual-linear dual-adapter
NORMS_16 := bn bn-mix dual-bn dual-ap dual-ns
TRADES_NORMS := bn dual-bn
grid_runs = $(foreach s,$(SEEDS),$(foreach n,$(NORMS_8),$(n)_hybrid_8_s$(s)) \
            $(foreach n,$(NORMS_16),$(n)_hybrid_16_s$(s)) $(foreach n,$(TRADES_NORMS),$(n)_trades_8_s$(s)))
# test-time recombinations of the dual-bn model (table 4): NAME:swap-bn flags
DERIVED ?= cross:--cross swap-ap:--swap-ap reest-adv-on-clean:--reestimate=clean@adv \
           reest-clean-on-adv:--reestimate=adv@clean reest-adv-on-noise:--reestimate=noise@adv
derived_names = $(foreach d,$(DERIVED),$(word 1,$(subst :, ,$(d))))
derived_flags = $(subst @, --branch ,$(word 2,$(subst :, ,$(filter $(1):%,$(DERIVED)))))
# a re-estimation's settings: $(1)_REEST for every domain, $(1)_REEST_PGD (PGD steps and step) for the adv domain
# only (swap-bn refuses PGD settings that a clean or noisy pass would ignore); $(2) = the derived model's flags
reest_flags = $(if $(findstring reestimate,$(2)),$($(1)_REEST)) $(if $(findstring reestimate=adv,$(2)),$($(1)_REEST_PGD))

field = $(word $(1),$(subst _, ,$(2)))
# the seed of a run or derived name ending in _sSEED
seed_of = $(patsubst s%,%,$(lastword $(subst _, ,$(1))))

# $(1) = root folder, $(2) = runs. Defines the rules of one pipeline; the scale comes from $(1)'s variables.
# report prints its summary to stdout; the rule keeps it quiet, and each target prints summary.txt at the end.
define pipeline
.PRECIOUS: $(1)/runs/%/model.safetensors $(1)/derived/%/model.safetensors  # intermediate, but never deleted
$(1)/runs/%/model.safetensors: | install $(CIFAR10)
	$$(HYBRIDAT) train --norm $$(call field,1,$$*) --loss $$(call field,2,$$*) --eps $$(call field,3,$$*) \
	    --step $$($(1)_STEP) \
	    --seed $$(call seed_of,$$*) $$($(1)_TRAIN) --resume --quiet --out $$(@D)
$(1)/runs/%/eval.csv: $(1)/runs/%/model.safetensors
	$$(HYBRIDAT) attack $$< --eps $$(call field,3,$$*) $$($(1)_EVAL) --out $$@
$(1)/runs/%/aa.csv: $(1)/runs/%/model.safetensors
	$$(HYBRIDAT) attack $$< --eps $$(call field,3,$$*) --attack autoattack $$($(1)_AA) --out $$@
$(1)/derived/%/model.safetensors: $(1)/runs/dual-bn_hybrid_8_s$$$$(call seed_of,$$$$*)/model.safetensors
	$$(HYBRIDAT) swap-bn $$< $$(call derived_flags,$$(call field,1,$$*)) \
	    $$(call reest_flags,$(1),$$(call derived_flags,$$(call field,1,$$*))) --out $$@
$(1)/derived/%/eval.csv: $(1)/derived/%/model.safetensors
	$$(HYBRIDAT) attack $$< --eps 8 $$($(1)_EVAL) --out $$@
$(1)/nsgap/%.csv: $(1)/runs/dual-bn_hybrid_8_s$$$$(call seed_of,$$$$*)/model.safetensors
	$$(HYBRIDAT) ns-gap $$< $$(if $$(findstring fixap,$$*),--fix-ap) $$($(1)_NSGAP) --out $$@
$(1)/report/report.md: $(2)
	$$(HYBRIDAT) report $(1)/runs $(1)/derived $(1)/nsgap --out $$(@D) > /dev/null
endef

# $(1) = root folder, $(2) = runs, $(3) = non-empty for AutoAttack, $(4) = seeds, $(5) = derived names
pipeline_files = $(foreach r,$(2),$(1)/runs/$(r)/eval.csv $(if $(3),$(1)/runs/$(r)/aa.csv)) \
    $(foreach s,$(4),$(foreach d,$(5),$(1)/derived/$(d)_s$(s)/eval.csv) \
                     $(1)/nsgap/own_s$(s).csv $(1)/nsgap/fixap_s$(s).csv)

# ---- paper scale (GPU)
TABLES := tables
$(TABLES)_STEP := 2  # training PGD step at every eps: 2/255 at eps 8 and 16, as SPEC and the authors' scripts
$(TABLES)_TRAIN ?= --epochs 110
$(TABLES)_EVAL ?= --attack clean --attack pgd --steps 10 --steps 20
$(TABLES)_AA ?= --n 1000
$(TABLES)_REEST ?= --n 10000
$(TABLES)_NSGAP ?= --eps 16 --n 512
$(eval $(call pipeline,$(TABLES),$(call pipeline_files,$(TABLES),$(grid_runs),aa,$(SEEDS),$(derived_names))))
tables: $(TABLES)/report/report.md
	@cat $(TABLES)/report/summary.txt

# ---- CPU scale: ResNet-18 at 1/8 width, 10,000 images, 5 epochs, PGD-3 training
MINI := mini
$(MINI)_STEP := 6.667  # PGD-3 covering the distance of PGD-10 with step 2 (10 x 2 = 3 x 6.667), at every eps
$(MINI)_TRAIN ?= --width 0.125 --train-subset 10000 --epochs 5 --steps 3 --device cpu
$(MINI)_EVAL ?= --n 1000 --attack clean --attack pgd --steps 10 --device cpu
$(MINI)_AA ?= --n 100 --device cpu
$(MINI)_REEST ?= --n 2000 --device cpu
$(MINI)_REEST_PGD ?= --steps 3 --step 6.667
$(MINI)_NSGAP ?= --eps 16 --n 256 --device cpu
$(eval $(call pipeline,$(MINI),$(call pipeline_files,$(MINI),$(grid_runs),aa,$(SEEDS),$(derived_names))))
mini: $(MINI)/report/report.md
	@cat $(MINI)/report/summary.txt

# ---- demo: bn and dual-bn at 1/8 width on 3,000 images; every stage at least once, no AutoAttack.
DEMO := demo
DEMO_RUNS := bn_hybrid_8_s0 dual-bn_hybrid_8_s0
DEMO_DERIVED := cross_s0 swap-ap_s0 reest-adv-on-clean_s0
$(DEMO)_STEP := 3
$(DEMO)_TRAIN ?= --width 0.125 --train-subset 3000 --epochs 4 --batch-size 64 --steps 3 --lr 0.05
$(DEMO)_EVAL ?= --n 500 --attack clean --attack pgd --steps 10 --batch-size 250
$(DEMO)_REEST ?= --n 1000
$(DEMO)_REEST_PGD ?= --steps 3 --step 3
$(DEMO)_NSGAP ?= --eps 16 --n 256
$(eval $(call pipeline,$(DEMO),$(foreach r,$(DEMO_RUNS),$(DEMO)/runs/$(r)/eval.csv) \
    $(foreach d,$(DEMO_DERIVED),$(DEMO)/derived/$(d)/eval.csv) $(DEMO)/nsgap/own_s0.csv $(DEMO)/nsgap/fixap_s0.csv))
demo: $(DEMO)/report/report.md
	@cat $(DEMO)/report/summary.txt
	@echo 'This demo is one seed of bn and dual-bn at a toy scale: a verdict needs 2 seeds or more, claims (1)-(2)'
	@echo 'need the other variants. What 3 to 6 seeds of each variant give: README, "What make study finds" (make study).'

# ---- study: the smallest grid that feeds every verdict of the Findings (report.md), 3 seeds, at a CPU scale.
# Claim 1: cross-bn vs dual-bn; 2: dual-ap, dual-ns vs dual-bn at eps 8 and 16; 3: ns-gap of dual-bn with and
# without --fix-ap; 4: dual-bn under --swap-ap; 5: dual-linear, dual-adapter, dual-bn and bn under TRADES against
# bn at eps 8. 33 trainings of ResNet-18 at 1/8 width on 10,000 images for 8 epochs (PGD-3), each evaluated on 2,000
# test images (clean, PGD-10). Estimated at 85 minutes on 2 otherwise idle cores (README, Pipelines). Resumable;
# `make -j2 study` gains nothing on 2 cores (each run already uses both).
STUDY := study
STUDY_SEEDS ?= 0 1 2
STUDY_SEEDS_16 ?= $(STUDY_SEEDS)  # the eps-16 runs' seeds, if not the same
STUDY_NORMS_8 := cross-bn dual-bn dual-ap dual-ns bn dual-linear dual-adapter
STUDY_NORMS_16 := dual-bn dual-ap dual-ns
STUDY_TRADES_NORMS := bn
study_runs = $(foreach s,$(STUDY_SEEDS),$(foreach n,$(STUDY_NORMS_8),$(n)_hybrid_8_s$(s)) \
                                        $(foreach n,$(STUDY_TRADES_NORMS),$(n)_trades_8_s$(s))) \
             $(foreach s,$(STUDY_SEEDS_16),$(foreach n,$(STUDY_NORMS_16),$(n)_hybrid_16_s$(s)))
$(STUDY)_STEP := 6.667
$(STUDY)_TRAIN ?= --width 0.125 --train-subset 10000 --epochs 8 --steps 3 --device cpu
$(STUDY)_EVAL ?= --n 2000 --attack clean --attack pgd --steps 10 --batch-size 250 --device cpu
$(STUDY)_NSGAP ?= --eps 16 --n 256 --device cpu
$(eval $(call pipeline,$(STUDY),$(call pipeline_files,$(STUDY),$(study_runs),,$(STUDY_SEEDS),swap-ap)))
study: $(STUDY)/report/report.md
	@cat $(STUDY)/report/summary.txt

# speed against a reference step, the FLOP floor and torchattacks (README, Speed); BENCH_FLAGS=--quick: minutes
BENCH_FLAGS ?=
bench: install
	$(HYBRIDAT) bench $(BENCH_FLAGS) --out bench/bench.csv

clean-demo:
	$(if $(strip $(DEMO)),,$(error DEMO names no folder))
	rm -rf $(addprefix $(DEMO)/,runs derived nsgap report)
	rmdir $(DEMO) 2>/dev/null || true
