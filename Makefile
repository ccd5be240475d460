# The README's commands. PYTHON is the interpreter of the environment classicnets is installed in.
PYTHON ?= python3
# The data root: a CLASSICNETS_DATA the user exported decides (README, "Data"); otherwise
# ../shared/data beside the checkout when it exists, else the cache. Made absolute, so tests that
# run from temporary folders (or link into the root) see the same files.
DATA ?= $(abspath $(or $(CLASSICNETS_DATA),$(wildcard ../shared/data),$(HOME)/.cache/classicnets))

.PHONY: setup demo test lint format bench

# CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,onnx,keras,tensorboard]" -q

demo:
	CLASSICNETS_DATA=$(DATA) $(PYTHON) -m classicnets run bn-mlp --quick

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: lint
	CLASSICNETS_DATA=$(DATA) $(PYTHON) -m pytest -q

bench:
	CLASSICNETS_DATA=$(DATA) $(PYTHON) benchmarks/bn_layer.py
	CLASSICNETS_DATA=$(DATA) $(PYTHON) benchmarks/mnist_mlp.py
	CLASSICNETS_DATA=$(DATA) $(PYTHON) benchmarks/experiment_wall.py
	CLASSICNETS_DATA=$(DATA) $(PYTHON) benchmarks/sweep_wall.py
