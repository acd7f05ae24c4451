# The interface to the pipeline. `make help` lists the targets; variables in CAPITALS pick the
# dataset and settings. A variable left empty keeps the default written in pipeline/config.py.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := data/demo
DEMO_STAMP := $(DEMO)/.generated

# --- variables passed to the CLI only when set -----------------------------------------------
DATA ?=
NAME ?=
opt = $(if $(strip $($(1))),--$(2) $($(1)))
COMMON  = $(call opt,DATA,data) $(call opt,NAME,name) $(call opt,WEIGHTS,weights) \
          $(call opt,SIZE,size) $(call opt,BATCH,batch) $(call opt,PRECISION,precision) \
          $(call opt,STORAGE,storage) $(call opt,SPLIT,split) $(call opt,LABELS,labels) \
          $(call opt,LABEL_COLUMNS,label-columns) $(call opt,SEED,seed)
CLI     = $(PYTHON) -m pipeline
# With no DATA, stages run on the embedded demo data (generated on first use).
DATA_DEP = $(if $(strip $(DATA)),,$(DEMO_STAMP))

.PHONY: help install demo-data extract train-head finetune evaluate predict report export demo \
        batch reproduce bench test test-slow clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: DATA NAME WEIGHTS SIZE BATCH PRECISION STORAGE SPLIT LABELS HEAD EPOCHS SEED UNFREEZE LR FRESH"
	@echo "             IMAGES MODEL OUT DATASETS BATCH_FILE FINETUNE FORCE (defaults: pipeline/config.py)"

install: $(STAMP) ## Create .venv with the pinned requirements

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

demo-data: $(DEMO_STAMP) ## Generate the embedded two-class demo images in data/demo (offline)

$(DEMO_STAMP): pipeline/demo_data.py | $(STAMP)
	$(CLI) demo-data --data $(DEMO)

extract: $(STAMP) $(DATA_DEP) ## Cache VGG16 features: DATA=<dir> [NAME] [WEIGHTS=imagenet|none|file] [SIZE=150]
	$(CLI) extract $(COMMON)

train-head: $(STAMP) $(DATA_DEP) ## Train heads on the cache: [NAME] [HEAD=dense|logreg|both] [EPOCHS=30] [SEED=0]
	$(CLI) train-head $(COMMON) $(call opt,HEAD,head) $(call opt,EPOCHS,epochs)

finetune: $(STAMP) $(DATA_DEP) ## Fine-tune block5 + head on images: [NAME] [UNFREEZE=block5] [EPOCHS] [LR=1e-5] [FRESH=0]
	$(CLI) finetune $(COMMON) $(call opt,UNFREEZE,unfreeze) $(call opt,EPOCHS,finetune-epochs) \
	  $(call opt,LR,lr) $(call opt,FRESH,fresh)

evaluate: $(STAMP) ## Test-split metrics and confusion matrices for every trained model: [NAME]
	$(CLI) evaluate $(COMMON)

predict: $(STAMP) ## Predict new images: IMAGES=<dir or file> [NAME] [MODEL=auto|finetuned|head|logreg]
	$(CLI) predict $(COMMON) $(call opt,IMAGES,images) $(call opt,MODEL,model)

report: $(STAMP) ## Write models/<NAME>/report.md: metrics, curves, confusion matrices, mistakes
	$(CLI) report $(COMMON)

export: $(STAMP) ## One HDF5 file that stands alone (features.h5 needs its segments): NAME=<name> OUT=<file.h5>
	$(CLI) export $(COMMON) $(call opt,OUT,out)

# The demo data are 64-pixel pictures, so the demo runs at SIZE=64: the same pipeline, a fraction
# of the compute. WEIGHTS=auto uses ImageNet weights when they can be had, random ones otherwise.
DEMO_ARGS = --data $(DEMO) --name demo --weights auto --size 64
demo: $(STAMP) $(DEMO_STAMP) ## The whole pipeline on the demo data, offline, in a few minutes
	$(CLI) extract $(DEMO_ARGS)
	$(CLI) train-head $(DEMO_ARGS)
	$(CLI) finetune $(DEMO_ARGS) --finetune-epochs 2
	$(CLI) evaluate $(DEMO_ARGS)
	$(CLI) report $(DEMO_ARGS)

batch: $(STAMP) ## Run every stage on many datasets: DATASETS="dirA dirB" or BATCH_FILE=<file> [FINETUNE=1] [FORCE=0]
	$(CLI) batch $(COMMON) $(if $(strip $(DATASETS)),--datasets $(DATASETS)) \
	  $(call opt,BATCH_FILE,batch-file) $(call opt,FINETUNE,finetune) $(call opt,FORCE,force) \
	  $(call opt,HEAD,head) $(call opt,EPOCHS,epochs) $(call opt,UNFREEZE,unfreeze) $(call opt,LR,lr)

reproduce: $(STAMP) ## The article's cats-vs-dogs experiment (needs internet: data + ImageNet weights)
	$(CLI) reproduce $(COMMON)

bench: $(STAMP) ## Performance figures -> bench/results.json [BENCH_N=..] [BENCH_ACCURACY=1]
	$(PYTHON) bench/bench.py

test: $(STAMP) ## Run the fast tests (CPU, tiny images)
	$(PYTHON) -m pytest -q

test-slow: $(STAMP) ## Also run the slow tests on ../shared/data/cats_vs_dogs
	$(PYTHON) -m pytest -q -m "slow or not slow"

clean: ## Remove generated demo data and the demo's outputs (not other datasets)
	rm -rf $(DEMO) features/demo models/demo
