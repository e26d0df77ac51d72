# One virtual environment per set of pinned requirements, cached outside the clone.
REQ_HASH := $(shell cat requirements/base.txt requirements/test.txt | sha256sum | cut -c1-16)
VENV ?= $(HOME)/.cache/atlas-fast/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: setup demo test bench clean

$(VENV)/.complete: requirements/base.txt requirements/test.txt
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any looser spec would pull a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/test.txt
	touch $@

setup: $(VENV)/.complete
	$(PY) -m pip install -q --no-deps -e .

demo: setup
	$(VENV)/bin/atlas-fast train

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf outputs build *.egg-info .pytest_cache
