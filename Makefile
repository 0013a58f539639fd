# One entry point for a fresh machine. `make test` builds two virtual environments and tests
# both ends of the supported version range (README, "Tested versions"):
#   .venv         the newest stack (constraints/newest.txt): the whole suite and the compile check
#   .venv-compat  the oldest stack (constraints/oldest.txt): what depends on triton and transformers
# Each installs torch first, pinned to the CPU wheel (a loose `torch` would pull a multi-GB CUDA
# build), then the project under the same constraints, so pip never replaces torch.
PYTHON ?= python3
VENV ?= .venv
COMPAT_VENV ?= .venv-compat
NEWEST = constraints/newest.txt
OLDEST = constraints/oldest.txt
EXTRAS = dev,trl
BIN = $(VENV)/bin
COMPAT_BIN = $(COMPAT_VENV)/bin
STAMP = $(VENV)/.livr-installed
COMPAT_STAMP = $(COMPAT_VENV)/.livr-installed
PYTEST_ARGS = -n 2 --timeout 900
# The old stack runs what triton or transformers can break: every kernel test under the
# interpreter (the CUDA-only file aside; TMA loads and the autotuner's tile agreement included) and
# the compile check's own tests, the tile schedules, the model patch, the tiny models, latents,
# training and evaluation, the version checks, and the CPU side of what `make gpu-report` runs on
# the GPU machine's triton 3.6 (the host path, the report script).
# Named files must exist (a missing one fails the run); the globs pick up new kernel and patch tests.
COMPAT_TESTS = tests/test_versions.py \
	$(filter-out tests/test_kernels_cuda.py,$(wildcard tests/test_*kernel*.py)) \
	tests/test_tma.py tests/test_dq_atomic.py tests/test_autotune.py \
	tests/test_compile_check.py tests/test_compile_tables.py tests/test_blocks.py tests/test_reference.py \
	tests/test_model_segments.py $(wildcard tests/test_patch*.py) \
	tests/test_tiny.py tests/test_latents.py tests/test_train.py tests/test_evaluate.py \
	tests/test_host_path.py tests/test_gpu_report.py

.PHONY: install install-compat test test-newest test-compat pytest-newest pytest-compat compile-check \
	compile-check-compat compile-check-all demo bench gpu-report clean

# $(1): virtual environment folder, $(2): constraints file
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --upgrade pip
	$(1)/bin/pip install -c $(2) torch
	$(1)/bin/pip install -c $(2) -e ".[$(EXTRAS)]"
	touch $(1)/.livr-installed
endef

$(STAMP): setup.py $(NEWEST)
	$(call make_venv,$(VENV),$(NEWEST))

$(COMPAT_STAMP): setup.py $(OLDEST)
	$(call make_venv,$(COMPAT_VENV),$(OLDEST))

install: $(STAMP)

install-compat: $(COMPAT_STAMP)

# -k: every check runs even when an earlier one fails, so one CI run reports both stacks; any
# failure (pytest's exit 5, no test collected, included) fails the target.
test:
	$(MAKE) -k test-newest test-compat

test-newest: compile-check pytest-newest

test-compat: compile-check-compat pytest-compat

pytest-newest: $(STAMP)
	LIVR_CONSTRAINTS=$(NEWEST) $(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Spills, shared memory and the SASS yardstick (sm_80 and sm_90) are checked on both stacks: the
# GPU machine runs triton 3.6 (benchmarks/RESULTS.md, "dK/dV at D=64 under Triton 3.6").
compile-check-compat: $(COMPAT_STAMP)
	$(COMPAT_BIN)/python -m livr_kernels.compile_check

pytest-compat: $(COMPAT_STAMP)
	LIVR_CONSTRAINTS=$(OLDEST) $(COMPAT_BIN)/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/livr-train --demo --output-dir demo_out --overwrite

compile-check: $(STAMP)
	$(BIN)/python -m livr_kernels.compile_check

# Every generation a fine-tuner may own (sm_80, 86, 89, 90, 100, 120) and head dim (16-256) under
# both Triton releases: too slow for CI from a cold Triton cache (CI checks sm_80 and sm_90), run it
# after kernel changes.
ALL_ARCHS = 80 86 89 90 100 120
compile-check-all: $(STAMP) $(COMPAT_STAMP)
	$(BIN)/python -m livr_kernels.compile_check --arch $(ALL_ARCHS) --full --jobs 2
	$(COMPAT_BIN)/python -m livr_kernels.compile_check --arch $(ALL_ARCHS) --full --jobs 2

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

# On a GPU machine: the torch and triton already installed there, never a venv or a pip install.
# livr comes from this checkout through PYTHONPATH. `make gpu-report GPU_REPORT_ARGS=--quick`
GPU_PYTHON ?= python3
GPU_REPORT_ARGS ?=
gpu-report:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_report.py $(GPU_REPORT_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) demo_out .pytest_cache .benchmarks
