# Two entry points (see README): `make demo` runs the main job offline, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test lint bench
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/natjax demo

test: $(STAMP)
	$(PY) -m ruff check natjax tests experiments
	$(PY) -m ruff format --check natjax tests experiments
	$(PY) -m pytest -n 2 -q tests

bench: $(STAMP)
	$(PY) experiments/bench_na.py
