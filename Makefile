# Every target bootstraps what it needs: a .venv with the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-long compare test test-all bench lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/margrpo demo --results docs/results.md

# the demo for 600 steps (25 min of training at 2.5 s a step), held-out and in-distribution accuracy every
# 200 steps (curve in the report)
demo-long: setup
	$(BIN)/margrpo demo --config demo-long.yaml --out runs/demo-long --results docs/results.md

# the paper's mar-grpo and the demo's recipe (mar-grpo-matching), 3 seeds each with the demo's settings
# (compare.yaml), plus null and positive controls; two worker processes (one per core); table into docs/results.md.
# About 100 min on a 2-core CPU; `--methods grpo mar-grpo mar-grpo-matching nft` adds the plain estimators
compare: setup
	$(BIN)/margrpo compare --methods mar-grpo mar-grpo-matching --seeds 0 1 2 --control-steps 15 --results docs/results.md

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# every benchmark; the train step also measures the demo's step of the code before issue #13 (06f4111) side by side
bench: setup
	$(BIN)/python -m benchmarks.run --against 06f4111

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
