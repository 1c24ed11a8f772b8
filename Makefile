# Two entry points (see README): `make demo` runs the main job offline, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

FFI_SOURCES := ffi/pyproject.toml ffi/CMakeLists.txt $(wildcard ffi/csrc/*/*.h ffi/csrc/*/*.cc ffi/src/natjax_ffi/*.py)

# natjax-ffi (the optional native kernels, ffi/) is compiled against the venv's jaxlib headers:
# no build isolation, so scikit-build-core is installed first.
$(STAMP): pyproject.toml $(FFI_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q 'scikit-build-core>=0.10'
	$(PY) -m pip install -q --no-build-isolation ./ffi
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
