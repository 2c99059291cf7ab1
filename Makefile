# The README's commands. Each sets up .venv from nothing when needed (torch, the dependencies, the extension),
# and rebuilds the extension when csrc/ or setup.py changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
BUILT := $(VENV)/.mixres-built
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu) setup.py pyproject.toml

.PHONY: install test test-random demo bench clean
install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)

# --no-build-isolation: the extension is compiled against the torch that will run it.
$(BUILT): $(PY) $(SOURCES)
	$(PY) -m pip install ninja setuptools wheel
	$(PY) -m pip install --no-build-isolation -e ".[test,demo]"
	touch $@

test: $(BUILT)
	$(PY) -m pytest tests -q

# make test draws the same examples on every run (tests/hypothesis_seed.py). This runs the tests that draw examples
# from a new seed, printed at the end; MIXRES_HYPOTHESIS_SEED=<seed> make test-random replays it.
test-random: $(BUILT)
	MIXRES_HYPOTHESIS_SEED=$${MIXRES_HYPOTHESIS_SEED:-random} $(PY) -m pytest tests -q -m hypothesis

demo: $(BUILT)
	$(PY) -m mixres.demo --out out/demo

# Writes benchmarks/results/<date>-<device>/ (JSON, log, environment), to be committed with RESULTS.md.
bench: $(BUILT)
	PYTHON=$(PY) benchmarks/bench.sh

clean:
	rm -rf build $(VENV) mixres/_C*.so out .pytest_cache .hypothesis .benchmarks
