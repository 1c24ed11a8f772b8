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
	$(PY) -m pip install -q -e '.[train,test]'
	$(PY) -m pip install -q 'scikit-build-core>=0.10'
	$(PY) -m pip install -q --no-build-isolation ./ffi
	touch $(STAMP)

.PHONY: install demo test lint bench compile-gate
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/natjax demo

test: $(STAMP)
	$(PY) -m ruff check natjax tests experiments
	$(PY) -m ruff format --check natjax tests experiments
	$(PY) -m pytest -n 2 -q tests

bench: $(STAMP)
	$(PY) experiments/bench_na.py

# Compile gate (docs/pallas.md): the Pallas kernels compiled for an H100 without a GPU, every
# kernel checked with ptxas. Its own venv: jax/jaxlib exactly the main venv's versions (read at
# run time) + the matching CUDA plugin (without [with-cuda]) + ptxas/libdevice.
# `make compile-gate GATE_ARGS=--quick` for the short table.
GATE_VENV := .venv-gate
GATE_ARGS ?=
compile-gate: $(STAMP)
	@jv=$$($(PY) -c 'import importlib.metadata as m; print(m.version("jax"))'); \
	lv=$$($(PY) -c 'import importlib.metadata as m; print(m.version("jaxlib"))'); \
	if [ ! -f $(GATE_VENV)/.installed-$$jv-$$lv ]; then \
	  rm -rf $(GATE_VENV) && $(PYTHON) -m venv $(GATE_VENV) && \
	  $(GATE_VENV)/bin/pip install -q --upgrade pip && \
	  $(GATE_VENV)/bin/pip install -q "jax==$$jv" "jaxlib==$$lv" "jax-cuda13-plugin==$$lv" \
	    "jax-cuda13-pjrt==$$lv" "nvidia-cuda-nvcc~=13.0.88" "nvidia-nvvm~=13.0.88" && \
	  touch $(GATE_VENV)/.installed-$$jv-$$lv; \
	fi
	$(GATE_VENV)/bin/python experiments/compile_gate.py $(GATE_ARGS)
