# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chanprune-installed

.PHONY: demo test bench bench-quick setup

setup: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU build cached on these machines, while an
# unpinned install would pull several GB of CUDA packages.
# torchvision and timm (the generality tests) go in with --no-deps for the same reason: their
# declared torch requirement would replace the CPU build. torchvision's compiled operators then do
# not load; chanprune/io/libraries.py works around that (see docs/generality.md).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchvision==0.28.0 timm==1.0.31
	$(PY) -m pip install -q --disable-pip-version-check huggingface_hub
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chanprune demo

test: $(STAMP)
	$(PY) -m pytest -q

# The results suite behind the README's Results section (about 95 minutes on 2 cores); it rewrites
# benchmarks/results/suite/ and the README block between the suite markers.
bench: $(STAMP)
	$(PY) -m benchmarks.run --update-readme

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick
