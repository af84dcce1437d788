# Every target bootstraps .venv first: a fresh machine needs nothing but python3 >= 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
URLS   ?=
ARGS   ?=

.PHONY: install demo run serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m crawler.demo

run: $(STAMP)
	@test -n "$(URLS)" || { echo "usage: make run URLS=path/to/urls.txt [ARGS='--out DIR ...']"; exit 2; }
	$(BIN)/python -m crawler $(URLS) $(ARGS)

serve: $(STAMP)
	$(BIN)/python -m crawler serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check crawler tests bench
	$(BIN)/ruff format --check crawler tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo *.egg-info
	find downloads -mindepth 1 ! -name .gitkeep -delete
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Benchmarks: figures, not pass/fail (see bench/README.md). nginx serves the corpus when it can be installed.
.PHONY: bench
bench: $(STAMP)
	-bash bench/install-nginx
	$(BIN)/python -m bench.run $(ARGS)
