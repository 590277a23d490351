# kfac2l - main entry points. `make test` alone sets everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_REQ ?= requirements-torch.txt
STAMP := $(VENV)/.installed

.PHONY: install test lint verify bench clean demo reproduce-all fashion-mnist
PROFILE ?= quick
LAUNCHER ?= local

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

# Fashion-MNIST offline: Debian's package (root, apt); otherwise torchvision downloads it.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1) || \
		echo "dataset-fashion-mnist not installable; torchvision will try to download Fashion-MNIST"

# README's main job: KFAC, every two-level method, ADAM and SGD on deep linear A / Fashion-MNIST.
# Trains everything afresh under $(DEMO_RESULTS); `make demo DEMO_RESULTS=results` refreshes the committed results.
DEMO_RESULTS ?= results/demo
demo: $(STAMP) fashion-mnist
	$(BIN)/python -m kfac2l.reproduce --figure 4 --panels deep_linear_a --profile quick --grid demo \
		--extra-figures 5 6 --results $(DEMO_RESULTS)

reproduce-figure%: $(STAMP)
	$(BIN)/python -m kfac2l.reproduce --figure $* --profile $(PROFILE) --launcher $(LAUNCHER)

reproduce-all: reproduce-figure2 reproduce-figure3 reproduce-figure4 reproduce-figure5 reproduce-figure6
