# Every target bootstraps what it needs: a .venv with the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo compare test test-all bench lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/margrpo demo --readme README.md

# grpo vs mar-grpo vs mar-grpo-matching, 3 seeds each at half the demo's steps, plus null and positive
# controls (about 49 min; compare runs on one thread); table into the README
compare: setup
	$(BIN)/margrpo compare steps=50 --seeds 0 1 2 --readme README.md

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
