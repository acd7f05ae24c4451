# The interface to the pipeline. `make help` lists the targets; variables in CAPITALS pick the
# dataset and settings. A variable left empty keeps the default written in pipeline/config.py.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
EXPORT_STAMP := $(VENV)/.installed-export
DEMO   := data/demo
DEMO_STAMP := $(DEMO)/.generated

# --- the settings: one Make variable per field of pipeline/config.py (`make help` lists them) ----
# Each is passed to the CLI only when set, so the defaults live in config.py alone. DATASETS
# (several folders) is passed apart; FEATURES_ROOT and MODELS_ROOT stay features/ and models/.
SETTINGS := DATA NAME SPLIT LABELS LABEL_COLUMNS BACKEND VERBOSE BACKBONE FEATURE_LAYER WEIGHTS \
            SIZE BATCH_SIZE PRECISION STORAGE AUGMENT ENGINE RAY_ADDRESS WORKERS HEAD EPOCHS \
            HIDDEN_UNITS DROPOUT HEAD_POOL HEAD_LR PATIENCE C_GRID SEED CLASS_WEIGHT UNFREEZE \
            FINETUNE_FROM CUT_STORAGE FINETUNE_EPOCHS \
            FINETUNE_OPTIMIZER FINETUNE_AUGMENT LR FINETUNE_WARMUP FINETUNE_PATIENCE FRESH IMAGES \
            MODEL OUT TOP_K FORMAT BATCH_FILE FINETUNE FORCE DUPLICATE_THRESHOLD AUDIT_FOLDS \
            OUTLIER_PERCENTILE
# Make exports command-line variables to every recipe's environment, and expands them to do so,
# which would run a $(shell ...) typed into one: none of these needs to be in the environment.
unexport $(SETTINGS) DATASETS
# Every value reaches the CLI as one shell word, exactly as typed: $(value) stops make from
# expanding $(...) inside it, single quotes stop the shell (a ' inside becomes '\''), and
# --option=VALUE keeps even LR=-1 a value, to be refused as such.
quote = '$(subst ','\'',$(1))'
option = --$(shell echo $(1) | tr A-Z_ a-z-)
# A command-line variable that is neither a setting nor one of the Makefile's own would be ignored
# without a word (AUGMNT=3 ran with AUGMENT's default): it stops make, naming the nearest setting.
# BENCH_* and KERAS_BACKEND reach bench/ and the tests through the environment.
MAKE_OWN := DATASETS TEST_WORKERS KERAS_BACKEND BENCH_% VENV PYTHON STAMP RAY_STAMP EXPORT_STAMP \
            BACKENDS_STAMP DEMO DEMO_STAMP
COMMAND_LINE := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
UNKNOWN := $(filter-out $(SETTINGS) $(MAKE_OWN),$(COMMAND_LINE))
ifneq ($(strip $(UNKNOWN)),)
$(error $(shell python3 -m pipeline.config --unknown $(foreach v,$(UNKNOWN),$(call quote,$(v)))))
endif
ARGS = $(foreach v,$(SETTINGS),$(if $(strip $(value $(v))),$(call option,$(v))=$(call quote,$(value $(v))))) \
       $(if $(strip $(value DATASETS)),--datasets $(foreach d,$(value DATASETS),$(call quote,$(d))))
# FROM_MAKE: the CLI's refusals then name Make variables (FINETUNE_EPOCHS=two, not --finetune-epochs)
CLI  = PIPELINE_FROM_MAKE=1 $(PYTHON) -m pipeline
# ENGINE=ray installs Ray (requirements-ray.txt, optional) into .venv on first use.
RAY_DEP = $(if $(filter ray,$(strip $(ENGINE))),$(RAY_STAMP))

.PHONY: help install install-ray demo-data extract train-head finetune evaluate predict report \
        audit export export-model demo batch reproduce bench test test-heavy coverage test-ray test-backends test-export test-slow lint clean

help: ## List the targets and the settings
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo; echo "Settings (VARIABLE=value; defaults in pipeline/config.py):"
	@python3 -m pipeline.config

install: $(STAMP) ## Create .venv with the pinned requirements, and `pipeline` importable anywhere

# The package itself goes in editable, without dependencies (the pins above are the set): bench/
# scripts and any other folder then import `pipeline` with no sys.path edits. It takes a second.
$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q -e . --no-deps
	touch $@

install-ray: $(RAY_STAMP) ## Add Ray to .venv (requirements-ray.txt), for ENGINE=ray and its tests

$(RAY_STAMP): requirements-ray.txt | $(STAMP)
	$(PYTHON) -m pip install -q -r requirements-ray.txt
	touch $@

# Demo images are written only when asked for (demo-data, demo): a stage without DATA reads the
# cache that extract made for NAME, or says which DATA= and NAME= it needs.
demo-data: $(DEMO_STAMP) ## Generate the embedded two-class demo images in data/demo (offline)

$(DEMO_STAMP): pipeline/data/demo.py | $(STAMP)
	$(CLI) demo-data --data $(DEMO)

extract: $(STAMP) $(RAY_DEP) ## Cache VGG16 features: DATA=<dir> [NAME] [WEIGHTS=imagenet|none|file] [SIZE=150] [AUGMENT=5]
	$(CLI) extract $(ARGS)

train-head: $(STAMP) ## Train heads on the cache: [NAME] [HEAD=dense|logreg|both] [EPOCHS=30] [SEED=extract's]
	$(CLI) train-head $(ARGS)

finetune: $(STAMP) ## Fine-tune block5 + head on the cached block4 activations (or images): [NAME] [UNFREEZE=extract's] [FINETUNE_EPOCHS=10] [LR=1e-4] [FINETUNE_FROM=cache] [FRESH=0]
	$(CLI) finetune $(ARGS)

evaluate: $(STAMP) ## Test-split metrics and confusion matrices for every trained model: [NAME]
	$(CLI) evaluate $(ARGS)

predict: $(STAMP) ## Predict new images: IMAGES=<dir or file> [NAME] [MODEL=auto|logreg|dense|finetuned] [OUT=file.csv] [TOP_K=1]
	$(CLI) predict $(ARGS)

audit: $(STAMP) ## Audit the cache (docs/audit.md): near-duplicates, leakage, label issues, outliers: [NAME] [DUPLICATE_THRESHOLD=0.6] [AUDIT_FOLDS=5]
	$(CLI) audit $(ARGS)

report: $(STAMP) ## Write models/<NAME>/report.md (+ self-contained report.html): metrics, curves, calibration, mistakes, audit
	$(CLI) report $(ARGS)

export: $(STAMP) ## One HDF5 file that stands alone (features.h5 needs its segments): NAME=<name> OUT=<file.h5>
	$(CLI) export $(ARGS)

export-model: $(STAMP) ## One graph, pixels -> probabilities, in models/<NAME>/export/: NAME=<name> [MODEL=auto|logreg|dense|finetuned] [FORMAT=savedmodel|onnx|litert]
	$(CLI) export-model $(ARGS)

# The demo data are 64-pixel pictures, so the demo runs at SIZE=64: the same pipeline, a fraction
# of the compute. WEIGHTS=auto uses ImageNet weights when they can be had, random ones otherwise.
DEMO_ARGS = --data $(DEMO) --name demo --weights auto --size 64
demo: $(STAMP) $(DEMO_STAMP) ## The whole pipeline on the demo data, offline, in a few minutes
	$(CLI) extract $(DEMO_ARGS) $(ARGS)
	$(CLI) train-head $(DEMO_ARGS) $(ARGS)
	$(CLI) finetune $(DEMO_ARGS) --finetune-epochs 2 $(ARGS)
	$(CLI) evaluate $(DEMO_ARGS) $(ARGS)
	$(CLI) report $(DEMO_ARGS) $(ARGS)

batch: $(STAMP) $(RAY_DEP) ## Run every stage on many datasets: DATASETS="dirA dirB" or BATCH_FILE=<file> [FINETUNE=1] [FORCE=0]
	$(CLI) batch $(ARGS)

reproduce: $(STAMP) $(RAY_DEP) ## The article's cats-vs-dogs experiment (needs internet: data + ImageNet weights)
	$(CLI) reproduce $(ARGS)

bench: $(STAMP) ## Performance figures -> bench/results.json [BENCH_N=..] [BENCH_ACCURACY=1] [BENCH_SMOKE=1: every phase, tiny, for CI]
	$(PYTHON) bench/bench.py

BACKENDS_STAMP := $(VENV)/.backends
$(BACKENDS_STAMP): requirements-backends.txt | $(STAMP)
	$(PYTHON) -m pip install -q -r requirements-backends.txt
	touch $@

# The suite runs on every core (pytest-xdist; at most 4 workers, as each holds TensorFlow). Each
# test file stays on one worker (loadscope), so a module's shared fixture is built once.
TEST_WORKERS ?= auto
PARALLEL := -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope
test: $(STAMP) ## Run the fast tests (CPU, tiny images, in parallel); CI adds test-ray and test-backends
	$(PYTHON) -m pytest -q $(PARALLEL)

# CI's suites in one process tree: the fast tests, the Ray ones and the cross-backend ones (whose
# other backend runs in a subprocess, which coverage does not follow)
# The tests over ten seconds each (several stages end to end, a kill and a resume, a process of
# their own): CI runs them after `make test`, which stays within 5 minutes without them
test-heavy: $(STAMP) ## Run the heavy tests (over 10 s each: end to end, kill and resume); CI runs them
	$(PYTHON) -m pytest -q $(PARALLEL) -m "heavy and not slow"

coverage: $(STAMP) ## Line coverage of pipeline/ by CI's tests (pytest-cov)
	$(PYTHON) -m pytest -q $(PARALLEL) -m "not slow" --cov=pipeline --cov-report=term

$(EXPORT_STAMP): requirements-export.txt | $(STAMP)
	$(PYTHON) -m pip install -q -r requirements-export.txt
	touch $@

# The ONNX and LiteRT exports run in their own runtimes here; without the extras (make test)
# those two tests skip, saying which extra they need.
test-export: $(STAMP) $(EXPORT_STAMP) ## export-model's tests with the ONNX and LiteRT runtimes (installs them first)
	$(PYTHON) -m pytest -q -m "not slow" tests/test_export_model.py

test-ray: $(STAMP) $(RAY_STAMP) ## ENGINE=ray's tests on a local Ray cluster (installs Ray first)
	$(PYTHON) -m pytest -q -m ray tests/test_ray.py

# Under JAX: the tests of every stage end to end, the loader and the input pipeline. Left out, to
# keep CI short: the hostile-input, labels, reproduce and Ray tests, whose subject (files, CSVs,
# the cache, the cluster) is the same on every backend.
BACKEND_TESTS := tests/test_extract.py tests/test_train_head.py tests/test_finetune.py \
                 tests/test_finetune_cache.py \
                 tests/test_evaluate.py tests/test_predict.py tests/test_report.py \
                 tests/test_batch.py tests/test_multiclass.py tests/test_images.py \
                 tests/test_input_pipeline.py tests/test_augment.py tests/test_quality.py \
                 tests/test_backends.py
# The cross-backend tests run from each side: TensorFlow's files read by JAX, then JAX's by TF.
test-backends: $(STAMP) $(BACKENDS_STAMP) ## Every stage's tests again, with JAX as the Keras backend
	$(PYTHON) -m pytest -q -m cross_backend tests/test_backends.py
	KERAS_BACKEND=jax $(PYTHON) -m pytest -q $(PARALLEL) -m "not slow" $(BACKEND_TESTS)

test-slow: $(STAMP) ## Also run the slow tests on ../shared/data/cats_vs_dogs
	$(PYTHON) -m pytest -q $(PARALLEL) -m "not cross_backend and not ray"

lint: $(STAMP) ## Check the code with ruff (pinned in requirements.txt; CI runs it)
	$(PYTHON) -m ruff check .

clean: ## Remove generated demo data and the demo's outputs (not other datasets)
	rm -rf $(DEMO) features/demo models/demo
