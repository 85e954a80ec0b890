# Set-up is part of every target: the virtualenv in .venv/ is created once and reused.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-fast spectral bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip<25"

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)  ## install, then train configs/listops-small.yaml (the embedded default job)
	$(BIN)/diffuser-graph train configs/listops-small.yaml $(if $(wildcard runs/listops-small/last.pt),--resume,)

test: $(STAMP)  ## install and run the whole test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## skip tests marked slow
	$(BIN)/python -m pytest -m "not slow"

spectral: $(STAMP)  ## install and run the spectral sweep on the shipped config
	$(BIN)/diffuser-graph spectral configs/spectral.yaml

bench: $(STAMP)  ## install, then run the attention speed/memory suite (~15 min)
	$(BIN)/python benchmarks/attention.py --out benchmarks/results

clean-venv:
	rm -rf $(VENV)
