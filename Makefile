# One-command entry points. Each target sets up .venv first if needed, with Python 3.11 (the version the
# project pins; torch installs from the local wheel cache where one exists, else from PyPI).
# `make predict` installs what prediction needs; `make test` adds the test and lint tools (the dev extra).
PYTHON ?= $(shell command -v python3.11 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
IMAGE ?=
HEATMAPS ?= heatmaps

.PHONY: setup setup-dev test lint predict python-check

python-check:
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 not found (looked for python3.11 on PATH; set PYTHON=/path/to/python3.11)" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
	  { echo "error: $(PYTHON) is not Python 3.11 (cxrscreen pins 3.11; set PYTHON=/path/to/python3.11)" >&2; exit 2; }

# A venv whose first install fails is removed again, so no half-built .venv is left behind.
$(BIN)/.installed: pyproject.toml | python-check
	@if [ ! -x $(BIN)/python ]; then \
	  set -x; $(PYTHON) -m venv $(VENV) && $(BIN)/pip install --upgrade pip && $(BIN)/pip install -e . \
	    || { rm -rf $(VENV); echo "error: the install failed; $(VENV) removed" >&2; exit 1; }; \
	else set -x; $(BIN)/pip install -e .; fi
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

setup-dev: $(BIN)/.installed-dev

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks scripts

test: setup-dev lint
	$(BIN)/pytest -q

predict: setup
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=path/to/xray.(png|jpg|dcm) [HEATMAPS=folder]"; exit 2; }
	$(BIN)/cxrscreen predict $(IMAGE) --heatmap $(HEATMAPS)
