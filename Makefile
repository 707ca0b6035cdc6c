# `make test` and `make run` do all the set-up on a fresh machine (a .venv in this folder),
# installing exactly the versions CI tested: requirements/lock-cpu.txt pins every dependency.
# `make test-latest` tries the newest versions pyproject.toml allows; `make lock` adopts them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock-cpu.txt
EXTRAS := .[test,bench,serve]
# Without an NVIDIA GPU, install the CPU build of torch first so nothing pulls a multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# The newest allowed versions are tried in a venv of their own, never in .venv.
LATEST := .venv-latest

.PHONY: install test run serve bench test-latest lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),yes)
	# With a GPU, torch and triton (and CUDA's own packages) are pip's choice for this machine;
	# every other package is held at the lock's version.
	grep -v -E '^(torch|triton|nvidia-)' $(LOCK) > $(VENV)/constraints-gpu.txt
	$(PY) -m pip install -q -c $(VENV)/constraints-gpu.txt -e "$(EXTRAS)"
else
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
endif
	$(PY) -m pip check
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

# The newest versions pyproject.toml's ranges allow (torch stays $(CPU_TORCH), the CPU build),
# in a fresh venv, then the whole suite: tells whether a dependency's release broke us.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(CPU_TORCH)" > $(LATEST)/torch.txt  # held: --upgrade would otherwise take a newer CUDA build
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch.txt "$(CPU_TORCH)"
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch.txt --upgrade --upgrade-strategy eager -e "$(EXTRAS)"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/freeze.txt
	$(LATEST)/bin/python -m pytest -p no:cacheprovider

# Adopt what test-latest tried, only when its suite passed: rewrites the lock (commit it).
# torch is written without its local label (2.13.0, not 2.13.0+cpu): pip takes the CPU build
# where one is offered to it, as CPU_TORCH does.
lock: test-latest
	{ echo "# Every dependency of offload_runtime (test, bench and serve extras included) at the version"; \
	  echo "# CI tested, for a machine without an NVIDIA GPU. Written by 'make lock' on $$(date -u +%Y-%m-%d)"; \
	  echo "# (Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())')); do not edit by hand."; \
	  sed 's/^torch==\([^+]*\)+cpu$$/torch==\1/' $(LATEST)/freeze.txt; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "wrote $(LOCK): review 'git diff $(LOCK)' and commit it"

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
