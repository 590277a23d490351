# kfac2l - main entry points. `make test` alone sets everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_REQ ?= requirements-torch.txt
STAMP := $(VENV)/.installed

.PHONY: install test lint verify bench clean

$(STAMP): pyproject.toml $(TORCH_REQ)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r $(TORCH_REQ)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kfac2l tests scripts

verify: $(STAMP)
	$(BIN)/python -m kfac2l.verify

bench: $(STAMP)
	$(BIN)/python -m kfac2l.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
