# Self-documenting: `make` or `make help` lists the targets with the comment above each.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# POLEN23E: $POLEN23E_DIR if set, else data/polen23e (`make data` downloads it there).
export POLEN23E_DIR ?= $(if $(wildcard data/polen23e),$(CURDIR)/data/polen23e,)

## Show this help
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-zA-Z0-9_-]+:/{if(doc){split($$0,t,":"); printf "  make %-12s %s\n", t[1], doc}; doc=""}' $(MAKEFILE_LIST)

# The other two Keras backends, CPU builds, for the library's tests on each: torch pinned to the
# CPU build this machine keeps on disk (an unpinned torch from PyPI is a CUDA build of several GB).
BACKEND_PKGS ?= torch==2.13.0 'jax>=0.4.34'
# KerasHub for the detection tests (tests/test_detection.py): models built from configs, no weights.
KERAS_HUB ?= 'keras-hub==0.32.*'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(BACKEND_PKGS)
	$(PY) -m pip install --quiet -e '.[study,test,hub,notebooks,peer,jax,torch,bulk,ray]'
	@# KerasHub without its dependencies: they pin tensorflow-text, which would replace this
	@# project's TensorFlow (the hub extra holds what its import needs)
	$(PY) -m pip install --quiet --no-deps $(KERAS_HUB)
	@# the git filter; .gitattributes (committed) already names notebooks/*.ipynb, so nbstripout
	@# adds no *.ipynb line there: results/*/notebooks/ keep their outputs
	@if [ -d .git ]; then $(VENV)/bin/nbstripout --install --attributes .gitattributes; fi
	@touch $(STAMP)

## Create or update the virtual environment in .venv with everything installed
venv: $(STAMP)

CI_NB := build/ci-notebooks
CORE_VENV := build/core-venv

## Run the test suite (TensorFlow), the library's tests on JAX and PyTorch, every notebook with small parameters, and the core-install check
# Five runs side by side (each target's output printed when it ends): the tests on TensorFlow
# and the notebooks are two processes that each keep about one core busy (much of either
# waits on tracing, kernels and subprocesses), so neither waits for the other. The JAX and
# PyTorch suites and the core install run at low priority (SIDE): they take what the two leave.
test: $(STAMP)
	@$(MAKE) --no-print-directory -j5 --output-sync=target SIDE='nice -n 15' \
	  test-main test-notebooks test-jax test-torch test-core

## The main suite alone: every test on TensorFlow (the study's tests and the browser test included)
test-main: $(STAMP) chromium
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q tests -p no:cacheprovider --durations=15

## Every notebook with small parameters under nbval (POLEN23E's when POLEN23E_DIR is set)
test-notebooks: $(STAMP)
	@rm -rf $(CI_NB)
	$(PY) -m cam.study.reproduce synthetic --small --prepare-only --out $(CI_NB)/synthetic
	@if [ -n "$(POLEN23E_DIR)" ]; then \
	  $(PY) -m cam.study.reproduce polen23e --small --prepare-only --out $(CI_NB)/polen23e; \
	else echo "POLEN23E_DIR is not set: the POLEN23E notebook runs are left out"; fi
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q $(CI_NB) --nbval-lax --nbval-current-env \
	  -p no:cacheprovider --durations=10

## The library's tests on the JAX and PyTorch backends
# The library's tests are every test not marked `study` (pyproject.toml): a test module of
# cam.study, the notebooks or TensorFlow itself says `pytestmark = pytest.mark.study`.
test-backends: test-jax test-torch

test-jax test-torch: test-%: $(STAMP)
	KERAS_BACKEND=$* $(SIDE) $(PY) -m pytest -q tests -m "not study" -p no:cacheprovider --durations=5

## Install the library with JAX alone (no TensorFlow, no study) in a throwaway venv and run its command line there
test-core:
	@rm -rf $(CORE_VENV) && $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SIDE) $(CORE_VENV)/bin/python -m pip install --quiet '.[jax]'
	@rm -rf build/lib build/bdist.* *.egg-info
	cd /tmp && KERAS_BACKEND=jax $(SIDE) $(CURDIR)/$(CORE_VENV)/bin/python $(CURDIR)/tests/core_install_check.py

# One target per notebook and dataset: a stamp build/reproduce/<dataset>/<name>.done, local to
# this checkout (build/ is git-ignored), touched when the notebook has run; the notebook writes
# its executed copy results/<dataset>/notebooks/<name>.ipynb (committed). A fresh clone has no
# stamps, so its first `make reproduce` runs everything; after that Make reruns a notebook only
# when one of its inputs is newer than its stamp: the notebook, the library and the parameters
# (cam/*.py, cam/study/*.py: reproduce.py holds STUDY and SMALL), and the checkpoint and fold
# table it reads (POLEN23E: the committed DenseNet-169; synthetic: the small CNN that notebook
# 02 trains into data/models when it is missing). A stamp is dated when its run started, so an
# input edited during the run counts. FORCE=1 reruns every notebook; the venv is order-only,
# so reinstalling it reruns nothing.
LIBRARY := $(wildcard cam/*.py cam/study/*.py)
INPUTS_polen23e := models/densenet169-polen23e-fold0.weights.h5.gz \
  models/densenet169-polen23e-fold0.json data/polen23e-folds.csv
INPUTS_synthetic := $(wildcard data/models/small-cnn-synthetic-fold0.weights.h5.gz \
  data/models/small-cnn-synthetic-fold0.json)
STUDY_NB := $(sort $(wildcard notebooks/0*.ipynb))
NB_polen23e := $(STUDY_NB:notebooks/%.ipynb=build/reproduce/polen23e/%.done)
NB_synthetic := $(STUDY_NB:notebooks/%.ipynb=build/reproduce/synthetic/%.done) \
  $(patsubst notebooks/%.ipynb,build/reproduce/synthetic/%.done,$(sort $(wildcard notebooks/A*.ipynb)))
FORCE_RERUN := $(if $(filter 1 yes true,$(FORCE)),force-rerun)
RAN = build/reproduce-$(1).ran

# $(call run-notebook,DATASET) in a notebook's recipe: say why, run it alone, log that it ran.
define run-notebook
@if [ -n "$(FORCE_RERUN)" ]; then why="FORCE=1"; \
elif [ -e $@ ]; then why="newer: $(filter-out force-rerun,$?)"; else why="not run in this checkout yet"; fi; \
echo "== $*: rerunning ($$why)"
@mkdir -p $(@D) && date +%s > $@.start
$(PY) -m cam.study.reproduce $(1) --only $(firstword $(subst -, ,$*))
@touch -d @$$(cat $@.start) $@ && rm -f $@.start
@echo $* >> $(call RAN,$(1))
endef

# $(call report-notebooks,DATASET) in `reproduce`/`demo`: what ran, what was up to date, the size.
define report-notebooks
@ran=$$(cat $(call RAN,$(1)) 2>/dev/null | tr '\n' ' '); \
skipped=$$(for nb in $(notdir $(basename $(NB_$(1)))); do \
  grep -qx "$$nb" $(call RAN,$(1)) 2>/dev/null || echo -n "$$nb "; done); \
echo "rerun: $${ran:-none}"; \
echo "up to date, skipped: $${skipped:-none}$${skipped:+(make $(2) FORCE=1 reruns them)}"; \
echo "results/$(1)/notebooks: $$(du -sh results/$(1)/notebooks | cut -f1) of executed notebooks"
@rm -f $(call RAN,$(1))
endef

$(NB_polen23e): build/reproduce/polen23e/%.done: notebooks/%.ipynb $(LIBRARY) \
  $(INPUTS_polen23e) $(FORCE_RERUN) | $(STAMP)
	$(call run-notebook,polen23e)

$(NB_synthetic): build/reproduce/synthetic/%.done: notebooks/%.ipynb $(LIBRARY) \
  $(FORCE_RERUN) | $(STAMP)
	$(call run-notebook,synthetic)
# (notebook 02 writes the synthetic checkpoint rather than reading it)
$(filter-out %/02-train-or-load.done,$(NB_synthetic)): $(INPUTS_synthetic)

# Forgets which notebooks the last, possibly interrupted, `reproduce`/`demo` reran.
reproduce-log-polen23e reproduce-log-synthetic: reproduce-log-%:
	@mkdir -p build && rm -f $(call RAN,$*)

force-rerun:

## Rerun the study on POLEN23E into results/polen23e: the notebooks whose inputs changed (FORCE=1: all)
reproduce: $(STAMP) reproduce-log-polen23e $(NB_polen23e)
	$(call report-notebooks,polen23e,reproduce)

## Run the same notebooks on the synthetic stand-in into results/synthetic (offline; FORCE=1 as above)
demo: $(STAMP) reproduce-log-synthetic $(NB_synthetic)
	$(call report-notebooks,synthetic,demo)

# The project's kernel (jupyter/kernels/python3/kernel.json) comes first on JUPYTER_PATH, in
# place of ipykernel's default "python3": a kernel that leaves what C++ writes to stderr
# (TensorFlow's oneDNN, cuInit and absl start-up log, XLA's "Compiled cluster" line) in the
# terminal that runs JupyterLab instead of pink blocks under the cells, as the executed
# notebooks are (cam/study/reproduce.py's KERNEL_ARGUMENTS). tests/test_browser.py uses it too.
# Its display name is ipykernel's, so a notebook saved from the lab keeps its metadata.
KERNELS := $(CURDIR)/jupyter

## Open JupyterLab on the explorer (notebooks/08-explore.ipynb); the other notebooks are beside it
lab: $(STAMP)
	JUPYTER_PATH=$(KERNELS)$${JUPYTER_PATH:+:$$JUPYTER_PATH} $(VENV)/bin/jupyter lab notebooks/08-explore.ipynb

## Drive the explorer in Chromium (installed here if missing); its screenshot becomes results/polen23e/figures/08-explorer.png
test-browser: $(STAMP) chromium
	@rm -f build/browser/08-explorer.png
	$(PY) -m pytest -q tests/test_browser.py -p no:cacheprovider -rs
	@if [ -f build/browser/08-explorer.png ]; then \
	  cp build/browser/08-explorer.png results/polen23e/figures/08-explorer.png; \
	  echo "results/polen23e/figures/08-explorer.png: the explorer as the browser test left it"; fi

# Debian's Chromium for the browser test (Playwright uses it; nothing downloads a browser).
# Where it cannot be installed the browser test is skipped and says why.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; \
	  elif command -v sudo >/dev/null; then sudo -n apt-get install -y -qq chromium >/dev/null 2>&1; fi; \
	  command -v chromium >/dev/null && echo "installed Debian's chromium" || \
	    echo "Chromium could not be installed: the browser test will be skipped"; }

## Download POLEN23E from figshare into data/polen23e (skipped when POLEN23E_DIR is set)
data: $(STAMP)
	@if [ -n "$(POLEN23E_DIR)" ] && [ -d "$(POLEN23E_DIR)" ]; then echo "POLEN23E found at $(POLEN23E_DIR)"; \
	else $(PY) -m cam.study.download --dest data/polen23e; fi

## Rebuild the leak-free fold table data/polen23e-folds.csv from the images
folds: $(STAMP)
	$(PY) -m cam.study.data folds

## Train DenseNet-169 on POLEN23E from scratch (about 90 minutes on 2 CPU cores)
train: $(STAMP)
	$(PY) -m cam.study.train

## Print the speed table (DenseNet-169, 224x224, 8 held-out images, every method and mode)
benchmark: $(STAMP)
	$(PY) benchmarks/speed.py

## Rebuild docs/findings.md's tables from results/polen23e/tables, then list misquoted numbers
# (cam/study/tables.py: standard library only, so it needs no venv; exits 1 if a number in the
# prose of docs/findings.md or README.md's findings is not in the table it cites)
findings:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m cam.study.tables

.PHONY: findings

.PHONY: help venv test test-main test-notebooks test-core test-backends test-jax test-torch chromium test-browser data folds train reproduce demo lab benchmark force-rerun \
  reproduce-log-polen23e reproduce-log-synthetic
