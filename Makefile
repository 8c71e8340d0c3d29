# Two entry points a newcomer needs (README's first lines): `make train DATA=...` and `make test`.
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data/chest_xray
OUT ?= training_output
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch 2.13.0 first: a CPU build (a bare "torch" would pull a multi-GB CUDA build)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev,dicom,onnx,serve]'
	touch $@

.PHONY: setup train test lint
setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/pneumoscan train --data_dir $(DATA) --output_dir $(OUT) $(ARGS)

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments *.py
