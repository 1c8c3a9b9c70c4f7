# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The torch release the project is tested with. On our machines pip finds a local CPU wheel of
# it; elsewhere pip may fetch a CUDA build. Pick another build with e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# pytest-xdist processes for `make test`: many tests wait on subprocesses (torchrun, the CLI, a
# server), so two workers finish sooner even on 2 cores; each test module stays on one worker
# (--dist loadscope) so its module-scoped fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: venv test test-fast test-gpu demo bench llamacpp clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,tensorboard]"
	touch $(STAMP)

# Tiers (pytest markers, registered in pyproject.toml): `test` runs everything, as CI does;
# `test-fast` leaves out the `slow` tests (processes, compiling, many training or sampling steps:
# under 2 minutes on 2 CPUs); `test-gpu` runs only the CUDA tests, which skip, saying why, without a GPU.
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

# make demo DATA=path/to/text.txt trains on that text instead; DEMO_SECONDS=600 trains longer.
demo: $(STAMP)
	$(PY) -m mini_transformer.demo $(if $(DATA),--input "$(DATA)") $(if $(DEMO_SECONDS),--seconds $(DEMO_SECONDS))

bench: $(STAMP)
	$(VENV)/bin/mini-transformer bench

# llama.cpp (llama-cpp-python, compiled from source: minutes) for the GGUF checks in
# tests/test_gguf.py, which skip without it, and for `bench --compare llamacpp`.
llamacpp: $(STAMP)
	$(PY) -m pip install -q -e ".[llamacpp]"

# What the commands made: the venv, runs and checkpoints (out/, out-*/), the prepared-data cache,
# benchmark output, Python's caches and build files. Your own files in data/ (data/input.txt,
# directories made by `prepare --out data/...`) stay. It says what it removes.
CLEAN := $(wildcard $(VENV) out out-* data/cache bench_out attention .pytest_cache *.egg-info build dist)
clean:
	@echo "removing: $(or $(CLEAN),nothing) (and __pycache__ directories)"
	rm -rf $(CLEAN)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
