# One virtual environment per set of pinned requirements, cached outside the clone.
REQ_HASH := $(shell cat requirements/base.txt requirements/test.txt | sha256sum | cut -c1-16)
VENV ?= $(HOME)/.cache/atlas-fast/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q
# The vLLM server's own virtualenv (requirements/vllm.txt says why); `make test` hands it to the
# tests through ATLAS_FAST_VLLM_PYTHON once `make vllm-env` has built it.
VLLM_HASH := $(shell cat requirements/vllm.txt | sha256sum | cut -c1-16)
VLLM_VENV ?= $(HOME)/.cache/atlas-fast/vllm-venv-$(VLLM_HASH)
VLLM_ENV := $(if $(wildcard $(VLLM_VENV)/.complete),ATLAS_FAST_VLLM_PYTHON=$(VLLM_VENV)/bin/python,)

.PHONY: setup demo test bench clean wheels vllm-env

# No file prerequisites: the hash in the folder's name already stands for the requirements, and a
# fresh clone's newer file times would otherwise rebuild a cached environment every time.
$(VENV)/.complete:
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any looser spec would pull a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/test.txt
	touch $@

setup: $(VENV)/.complete
	# setuptools reports every editable install of a package_dir layout (kernels/ installs as
	# atlas_kernels) with a 10-line "Editable installation." notice; it is informational only.
	$(PY) -W "ignore:Editable installation:UserWarning" -m pip install -q --no-deps -e .

demo: setup
	$(VENV)/bin/atlas-fast train

test: setup
	$(VLLM_ENV) $(PY) -m pytest $(PYTEST_ARGS) tests

$(VLLM_VENV)/.complete:
	rm -rf $(VLLM_VENV)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements/vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

vllm-env: $(VLLM_VENV)/.complete

bench: setup
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf outputs build *.egg-info .pytest_cache

# Pure-Python peers for a GPU machine without network (python 3.12 image): carried as .whl/.
GPU_PEERS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
	liger-kernel==0.8.5 cut-cross-entropy==25.1.1 hydra-core==1.3.8 omegaconf==2.3.0
wheels:
	mkdir -p .whl
	pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl $(GPU_PEERS)
	pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
