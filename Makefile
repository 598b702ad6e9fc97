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
	$(PY) -m pip install --quiet -e '.[test,notebooks,peer]'
	@if [ -d .git ]; then $(VENV)/bin/nbstripout --install --attributes .gitattributes; fi
	@touch $(STAMP)

## Create or update the virtual environment in .venv with everything installed
venv: $(STAMP)

NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
CI_NB := build/ci-notebooks
PM := $(VENV)/bin/papermill --log-output --no-progress-bar
# Caps shared by the later notebooks: a few images, one timed call, small samples.
SMALL_COST := -p max_images 4 -p repeats 1 -p budget_s 1 -p sample_masks 8
# Small parameters for CI: the synthetic stand-in at 64 px, and one held-out image per class.
SYNTH_SMALL := -p dataset synthetic -p output_dir $(CURDIR)/$(CI_NB)/results/synthetic -p image_size 64 \
	-p train_size 64 -p epochs 10 -p architecture small_cnn -p mode train -p batch_size 16 \
	-p samples_per_class 2 -p thumb_size 48 $(SMALL_COST)
POLEN_SMALL := -p dataset polen23e -p output_dir $(CURDIR)/$(CI_NB)/results/polen23e -p mode load \
	-p held_out_per_class 1 -p samples_per_class 1 -p thumb_size 48 -p batch_size 8 $(SMALL_COST)

## Run the test suite and every notebook with small parameters (creates .venv if needed)
test: $(STAMP)
	@rm -rf $(CI_NB) && mkdir -p $(CI_NB)
	@for nb in $(NOTEBOOKS); do \
	  $(PM) --prepare-only $$nb $(CI_NB)/synthetic-$$(basename $$nb) $(SYNTH_SMALL) >/dev/null || exit 1; \
	  if [ -n "$(POLEN23E_DIR)" ]; then \
	    $(PM) --prepare-only $$nb $(CI_NB)/polen23e-$$(basename $$nb) $(POLEN_SMALL) >/dev/null || exit 1; fi; \
	done
	$(PY) -m pytest -q tests $(CI_NB) --nbval-lax --nbval-current-env -p no:cacheprovider

## Rerun the study on POLEN23E: every notebook, figures and tables into results/polen23e
reproduce: $(STAMP) data
	@mkdir -p results/polen23e/executed
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(PM) $$nb results/polen23e/executed/$$(basename $$nb) -p dataset polen23e || exit 1; \
	done

## Run the same notebooks on the synthetic stand-in into results/synthetic (offline, minutes)
demo: $(STAMP)
	@mkdir -p results/synthetic/executed
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(PM) $$nb results/synthetic/executed/$$(basename $$nb) -p dataset synthetic \
	    -p architecture small_cnn -p train_size 128 -p image_size 128 -p epochs 15 || exit 1; \
	done

## Open the notebooks in JupyterLab
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

## Download POLEN23E from figshare into data/polen23e (skipped when POLEN23E_DIR is set)
data: $(STAMP)
	@if [ -n "$(POLEN23E_DIR)" ] && [ -d "$(POLEN23E_DIR)" ]; then echo "POLEN23E found at $(POLEN23E_DIR)"; \
	else $(PY) -m cam.download --dest data/polen23e; fi

## Rebuild the leak-free fold table data/polen23e-folds.csv from the images
folds: $(STAMP)
	$(PY) -m cam.data folds

## Train DenseNet-169 on POLEN23E from scratch (about 90 minutes on 2 CPU cores)
train: $(STAMP)
	$(PY) -m cam.train

## Print the speed table (DenseNet-169, 224x224, 8 held-out images, every method and mode)
benchmark: $(STAMP)
	$(PY) benchmarks/speed.py

.PHONY: help venv test data folds train reproduce demo lab benchmark
