# fastssl: `make test` and `make demo` do all the set-up on a fresh Linux machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The extension's CUDA architectures: TORCH_CUDA_ARCH_LIST if set, else the visible GPU's,
# else sm_80/86/89/90/100 + PTX (fastssl/_build.py).

.PHONY: venv data wordnet test demo bench lint cuda-check clean compile-gate-triton36

# A machine whose python already has torch >= 2.6 (a GPU box) keeps it: the venv
# sees the system packages and no second torch is installed.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then \
	    echo "using the torch of $(PYTHON) (>= 2.6)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV) && $(VPY) -m pip install -q --upgrade pip && $(VPY) -m pip install -q $(TORCH_PAIR); \
	  fi; \
	fi
	$(VPY) -m pip install -q setuptools wheel ninja pybind11
	$(VPY) -m pip install -q --no-build-isolation -e '.[dev,dali,viz,wordnet,clip]'
	@touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian's package, where apt is available.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist (or pass --data PATH)"; fi; \
	fi

# WordNet 3.0 (vocabularies, hierarchies) from Debian's packages, where apt is available.
WORDNET_PACKAGES := wordnet-base wordnet-sense-index
wordnet:
	@if [ ! -f /usr/share/wordnet/index.sense ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $(WORDNET_PACKAGES); \
	  else echo "WordNet missing: install Debian's $(WORDNET_PACKAGES) (or set FASTSSL_WORDNET to a WordNet 3.0 dict folder)"; fi; \
	fi

# Each .cu is plain CUDA C++: it must compile with bare nvcc (no torch headers). One architecture
# is enough for that; the build (setup.py) compiles every listed one.
cuda-check:
	@if command -v nvcc >/dev/null; then \
	  archs=$$(nvcc --list-gpu-code | grep -E '^sm_(80|86|89|90|100)$$' | head -1 | sed 's/sm_\(.*\)/-gencode=arch=compute_\1,code=sm_\1/'); \
	  for f in csrc/cuda/*.cu; do echo "nvcc -c $$f ($$(echo $$archs | grep -o 'sm_[0-9]*' | tr '\n' ' '))"; \
	    nvcc -std=c++17 $$archs -c $$f -o /tmp/fastssl_$$(basename $$f).o || exit 1; done; \
	else echo "nvcc not found: skipping the .cu compile check"; fi

lint: venv
	$(VENV)/bin/ruff check fastssl tests benchmarks

test: venv data wordnet cuda-check lint
	FASTSSL_GATE_COVERAGE=require $(VPY) -m pytest -q -n 2 --durations=15

# The compile gate under triton 3.6 (the GPU machine's version) beside the venv's newer one:
# triton alone in its own directory, first on the path (compiling needs no matching torch).
TRITON36 := .triton-3.6
$(TRITON36)/.installed:
	$(VPY) -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	@touch $@

compile-gate-triton36: venv $(TRITON36)/.installed
	PYTHONPATH=$(CURDIR)/$(TRITON36):$(CURDIR) TRITON_CACHE_DIR=$(CURDIR)/$(TRITON36)/cache \
	  $(VPY) tests/ops/compile_gate.py --targets 80,89,90,100 --json $(TRITON36)/gate.json \
	  --results benchmarks/results/compile_gate.jsonl

demo: venv data
	$(VENV)/bin/fastssl train

bench: venv
	$(VENV)/bin/fastssl bench

clean:
	rm -rf build *.egg-info fastssl/_C*.so
