# fishds: `make demo` runs the embedded default job, `make test` the test suite.
# Both create or reuse .venv and install what is needed: requirements/cpu.txt (CPU torch build) on
# machines without an NVIDIA GPU, requirements/gpu.txt (keeps your CUDA torch) where nvidia-smi works, and
# requirements/dev.txt (pytest, ruff, TRL, trackers) with either.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
REQS := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo requirements/gpu.txt; else echo requirements/cpu.txt; fi)

.PHONY: setup demo lint test test-fast bench clean

setup: $(VENV)/.fishds-installed

$(VENV)/.fishds-installed: pyproject.toml requirements/cpu.txt requirements/gpu.txt requirements/dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQS) -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/train.py \
		--ds_config ds_configs/zero3.json --config configs/demo.yaml $(ARGS)

LINT_PATHS := fishds launch bench tests

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

test: lint
	$(PY) -m pytest -q --durations=15 tests $(ARGS)

# a few minutes: unit tests and one 2-rank ZeRO-3 run (Fisher against a reference, masked entries fixed)
FAST := tests/test_units.py tests/test_layout.py tests/test_select_radix.py tests/test_rules_units.py tests/test_structured_units.py \
	tests/test_distributed.py::test_zero3_two_ranks_matches_reference_fisher_and_freezes_masked
test-fast: lint
	$(PY) -m pytest -q $(FAST) $(ARGS)

bench: setup
	$(PY) bench/step_time.py $(ARGS)

clean:
	rm -rf $(VENV) runs
