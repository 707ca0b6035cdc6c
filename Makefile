# `make test` and `make run` do all the set-up on a fresh machine (a .venv in this folder).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Without an NVIDIA GPU, install the CPU build of torch first so nothing pulls a multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: install test run serve bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e ".[test,bench,serve]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

run: install
	$(PY) -m offload_runtime.run $(ARGS)

serve: install
	$(PY) -m offload_runtime.serve $(ARGS)

bench: install
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
