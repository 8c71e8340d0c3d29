# The entry points a newcomer needs (README's first lines): `make serve`, `make test`, `make train DATA=...`.
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

.PHONY: setup serve train test lint
setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/pneumoscan serve $(ARGS)

train: setup
	$(VENV)/bin/pneumoscan train --data_dir $(DATA) --output_dir $(OUT) $(ARGS)

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments *.py
