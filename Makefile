# kfac2l - main entry points. `make test` alone sets everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_REQ ?= requirements-torch.txt
STAMP := $(VENV)/.installed

.PHONY: install test lint verify bench clean demo reproduce-all fashion-mnist status readme evidence recheck evidence-paired evidence-status
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
	$(BIN)/ruff check kfac2l tests scripts examples

verify: $(STAMP)
	$(BIN)/python scripts/verify.py

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Fashion-MNIST offline: Debian's package (root, apt); otherwise torchvision downloads it.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1) || \
		echo "dataset-fashion-mnist not installable; torchvision will try to download Fashion-MNIST"

# README's main job: KFAC, every two-level method, ADAM and SGD on deep linear A / Fashion-MNIST,
# 2 x 2 grid, then 3 seeds of the selected settings (bands). Trains everything afresh under $(DEMO_RESULTS).
DEMO_RESULTS ?= results/demo
demo: $(STAMP) fashion-mnist
	@start=$$(date +%s); \
	$(BIN)/python scripts/reproduce.py --figure 4 --panels deep_linear_a --profile quick --grid demo \
		--seeds 1 2 3 --launcher joblib --extra-figures 5 6 --results $(DEMO_RESULTS) && \
	echo "make demo: $$(( $$(date +%s) - start )) s in all"

# Which cells of a figure's sweep are complete / diverged / interrupted / missing (exit 1 while unfinished).
FIGURE ?= 4
status: $(STAMP)
	$(BIN)/python scripts/status.py --figure $(FIGURE) --profile $(PROFILE) $(STATUS_ARGS)

# README and docs/report.md tables and numbers from the committed result files (a test fails when they disagree).
readme: $(STAMP)
	$(BIN)/python scripts/report.py

# Do the committed results still reproduce at this commit? 2 epochs of one run per optimiser, arm and commit, bit for bit.
# RECHECK_ARGS="--record results/recheck/NAME.json" keeps the outcomes (the report's recheck table).
recheck: $(STAMP) fashion-mnist
	OMP_NUM_THREADS=1 $(BIN)/python scripts/recheck.py $(RECHECK_ARGS)

# The paper-profile evidence on deep linear A (hours on a laptop; resumable: rerun to continue).
evidence: $(STAMP) fashion-mnist
	$(BIN)/python scripts/reproduce.py --figure 4 --panels deep_linear_a --profile paper --grid small \
		--grid-epochs 10 --seeds 1 2 3 --launcher $(LAUNCHER) --extra-figures 5 6
	$(BIN)/python scripts/reproduce.py --figure 7 --profile paper --launcher $(LAUNCHER)

# The paired deep-linear-A evidence of docs/report.md (issue 15), in priority order; resumable: rerun to continue.
# ARMS="selected matched" limits it; two runs at a time, one thread each, at nice 19 (and autogroup nice 19:
# under Linux's autogroup scheduling nice alone does not yield to work started from another session).
ARMS ?=
evidence-paired: $(STAMP) fashion-mnist
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python -m kfac2l.plan --run $(if $(ARMS),--only $(ARMS),)

# Complete runs per arm of kfac2l.plan against those expected (reads the result files only).
evidence-status: $(STAMP)
	$(BIN)/python -m kfac2l.plan --status $(if $(ARMS),--only $(ARMS),)

reproduce-figure%: $(STAMP)
	$(BIN)/python scripts/reproduce.py --figure $* --profile $(PROFILE) --launcher $(LAUNCHER)

reproduce-all: reproduce-figure2 reproduce-figure3 reproduce-figure4 reproduce-figure5 reproduce-figure6
