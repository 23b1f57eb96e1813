# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

DEMO_WORKDIR ?= demo_work
DEMO_CONFIG ?= configs/demo.py
DEMO_ARGS ?=

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m vbert_jax.demo.main --config=$(DEMO_CONFIG) \
	  --workdir=$(DEMO_WORKDIR) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	for b in $(filter-out bench/common.py bench/train_step_gpu.py,$(wildcard bench/*.py)); do JAX_PLATFORMS=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache
