# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

# torch first: the pinned CPU wheel is on the local disk; installing it before anything that
# depends on torch keeps pip from fetching a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/conceptguard demo --out out/demo

test: install
	$(PY) -m pytest -q --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) out runs
