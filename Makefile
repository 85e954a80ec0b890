# Set-up is part of every target: a virtualenv in .venv/ is created once, with the first Python
# 3.10-3.12 found (scripts/find-python; or PYTHON=/path/to/python), and reused while its Python
# stays the one found.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHON

.PHONY: train test test-fast lint spectral bench venv clean-venv

venv:  ## create .venv with a supported Python, or rebuild it if it was made with another one
	@python=$$(scripts/find-python) || exit 1; \
	want=$$("$$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	if [ -x $(BIN)/python ]; then \
	    have=$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	    if [ "$$have" != "$$want" ]; then \
	        echo "rebuilding $(VENV): it was made with Python $${have:-(broken)}, the Python found is $$want ($$python)"; \
	        rm -rf $(VENV); \
	    fi; \
	fi; \
	if [ ! -x $(BIN)/python ]; then \
	    echo "creating $(VENV) with $$python (Python $$want)"; \
	    "$$python" -m venv $(VENV) && $(BIN)/python -m pip install --quiet --upgrade "pip<25"; \
	fi

$(STAMP): pyproject.toml | venv
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: venv $(STAMP)  ## install, then train configs/listops-small.yaml (the embedded default job)
	$(BIN)/diffuser-graph train configs/listops-small.yaml $(if $(wildcard runs/listops-small/last.pt),--resume,)

lint: venv $(STAMP)  ## ruff (style, imports, bugbear, pyupgrade) and mypy (types) on the code
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint  ## install, lint, type-check and run the whole test suite (CI runs exactly this)
	$(BIN)/python -m pytest

test-fast: venv $(STAMP)  ## the tests not marked slow (no notebooks, end-to-end runs, DDP, bench)
	$(BIN)/python -m pytest -m "not slow"

spectral: venv $(STAMP)  ## install and run the spectral sweep on the shipped config
	$(BIN)/diffuser-graph spectral configs/spectral.yaml

bench: venv $(STAMP)  ## install, then run the attention, layer and training speed/memory suites (~1 h)
	$(BIN)/python benchmarks/attention.py --out benchmarks/results
	$(BIN)/python benchmarks/layers.py --preset peers --out benchmarks/results
	$(BIN)/python benchmarks/layers.py --preset official --out benchmarks/results
	$(BIN)/python benchmarks/training.py --out benchmarks/results

clean-venv:
	rm -rf $(VENV)
