# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The runtime requirements are all that `make demo` needs; `make test` and `make bench` add the
# reference implementations they compare against (PyTorch, transformers, faiss) and libtpu. One
# .venv serves both: each target installs only what its stamp says is missing.
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: install install-dev demo worlds test bench clean

install: $(RUNTIME)

install-dev: $(DEV)

$(RUNTIME): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(DEV)

DEMO_WORKDIR ?= demo_work
DEMO_CONFIG ?= configs/demo.py
DEMO_ARGS ?=

demo: $(RUNTIME)
	JAX_PLATFORMS=cpu $(PY) -m vbert_jax.demo.main --config=$(DEMO_CONFIG) \
	  --workdir=$(DEMO_WORKDIR) $(DEMO_ARGS)

# The demo on each of its three test worlds, then each figure's mean and spread over them.
WORLDS_WORKDIR ?= demo_worlds

worlds: $(RUNTIME)
	JAX_PLATFORMS=cpu $(PY) -m vbert_jax.demo.worlds --config=$(DEMO_CONFIG) --split=test \
	  --workdir=$(WORLDS_WORKDIR) $(DEMO_ARGS)

test: $(DEV)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(DEV)
	for b in $(filter-out bench/common.py bench/train_step_gpu.py,$(wildcard bench/*.py)); do JAX_PLATFORMS=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache
