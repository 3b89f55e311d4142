# Two commands matter: `make run` and `make test`. Both set up the venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-dev
# The JavaScript example needs Node.js; leave it out where node is missing.
EXAMPLES := $(if $(shell command -v node 2>/dev/null),examples/,examples/hello examples/pipeline examples/crasher)

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
	touch $@

setup: $(STAMP)

run: setup  ## start the runtime with the examples (Ctrl-C stops it)
	$(VENV)/bin/corral up -f $(EXAMPLES)

test: setup  ## the whole suite
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check corral tests bench examples scripts
	$(VENV)/bin/mypy

bench: setup  ## Corral against Ray and AutoGen, in one run
	$(PY) -m pip install -q -e ".[bench]" --config-settings editable_mode=compat
	$(PY) -m bench.run
	$(PY) -m bench.policy_bench
	$(PY) -m bench.audit_bench
	$(PY) -m bench.guard_bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
