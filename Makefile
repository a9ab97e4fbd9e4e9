# One-command entry points. Each target sets up .venv first if needed (Python 3.11; torch installs from
# the local wheel cache where one exists, else from PyPI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
IMAGE ?=
HEATMAPS ?= heatmaps

.PHONY: setup test lint predict

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

test: setup lint
	$(BIN)/pytest -q

predict: setup
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=path/to/xray.(png|jpg|dcm) [HEATMAPS=folder]"; exit 2; }
	$(BIN)/cxrscreen predict $(IMAGE) --heatmap $(HEATMAPS)
