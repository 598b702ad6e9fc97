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

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[study,test,notebooks,peer]'
	@if [ -d .git ]; then $(VENV)/bin/nbstripout --install --attributes .gitattributes; fi
	@touch $(STAMP)

## Create or update the virtual environment in .venv with everything installed
venv: $(STAMP)

CI_NB := build/ci-notebooks
CORE_VENV := build/core-venv

## Run the test suite, every notebook with small parameters, and the core-install check
test: $(STAMP) test-core
	@rm -rf $(CI_NB)
	$(PY) -m cam.study.reproduce synthetic --small --prepare-only --out $(CI_NB)/synthetic
	@if [ -n "$(POLEN23E_DIR)" ]; then \
	  $(PY) -m cam.study.reproduce polen23e --small --prepare-only --out $(CI_NB)/polen23e; \
	else echo "POLEN23E_DIR is not set: the POLEN23E notebook runs are left out"; fi
	$(PY) -m pytest -q tests $(CI_NB) --nbval-lax --nbval-current-env -p no:cacheprovider --durations=15

## Install the library alone (no extras) in a throwaway venv and run its command line there
test-core:
	@rm -rf $(CORE_VENV) && $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CORE_VENV)/bin/python -m pip install --quiet .
	@rm -rf build/lib build/bdist.* *.egg-info
	cd /tmp && $(CURDIR)/$(CORE_VENV)/bin/python $(CURDIR)/tests/core_install_check.py

## Rerun the study on POLEN23E: every notebook, figures and tables into results/polen23e
reproduce: $(STAMP)
	$(PY) -m cam.study.reproduce polen23e

## Run the same notebooks on the synthetic stand-in into results/synthetic (offline, minutes)
demo: $(STAMP)
	$(PY) -m cam.study.reproduce synthetic

## Open the notebooks in JupyterLab
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

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

.PHONY: help venv test test-core data folds train reproduce demo lab benchmark
