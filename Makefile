# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# `make test-compat`: the same suite on a second Python and the newest JAX the pins allow (README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS := -q -n auto --dist loadfile --no-loadscope-reorder --durations=15

# The compat suite's interpreter and JAX: COMPAT_JAX is a pip requirement such as 'jax==0.11.*';
# empty takes the newest that pyproject.toml allows (what a fresh install gets). torch is left out:
# the torch==2.13.0 CPU wheel on this machine's disk is for Python 3.11 only (its tests skip).
COMPAT_PYTHON ?= $(HOME)/.pyenv/versions/3.12.1/bin/python3
COMPAT_JAX    ?=
COMPAT_VENV   ?= .venv-compat
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_STAMP  := $(COMPAT_VENV)/.installed

.PHONY: demo test test-compat install bench clean FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

# The demo replaces its previous run (experiments refuse a workdir holding one without --overwrite).
demo: $(STAMP)
	$(PY) -m experiments.seed_simple_net --overwrite

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

$(COMPAT_PY):
	@test -x "$(COMPAT_PYTHON)" || { echo "make test-compat: no Python at COMPAT_PYTHON=$(COMPAT_PYTHON);" \
	  "install it (pyenv install 3.12) or pass COMPAT_PYTHON=/path/to/python3" >&2; exit 1; }
	"$(COMPAT_PYTHON)" -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip

# Rewritten only when COMPAT_JAX changes, so that the install below reruns for another JAX.
$(COMPAT_VENV)/.jax-choice: FORCE | $(COMPAT_PY)
	@echo "$(COMPAT_JAX)" | cmp -s - $@ || echo "$(COMPAT_JAX)" > $@

# --upgrade: an empty COMPAT_JAX moves an existing venv to the newest JAX the pins allow.
$(COMPAT_STAMP): pyproject.toml $(COMPAT_VENV)/.jax-choice
	$(COMPAT_PY) -m pip install --quiet --upgrade -e ".[test,plots,data,logs,compress,explain]" $(COMPAT_JAX)
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import sys, jax, jaxlib; print('test-compat: Python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
	$(COMPAT_PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench_seed

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache .hypothesis
