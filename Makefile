# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chanprune-installed

.PHONY: demo test bench setup

setup: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU build cached on these machines, while an
# unpinned install would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chanprune demo

test: $(STAMP)
	$(PY) -m pytest -q
