# metalearn: `make train` sets up and runs the default experiment; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/metalearn train

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf outputs multirun .pytest_cache
