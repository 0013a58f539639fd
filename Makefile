# One entry point for a fresh machine: `make test` and `make demo` build the virtual environment,
# install torch first (the pinned CPU wheel; a loose `torch` would pull a multi-GB CUDA build),
# then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.livr-installed

.PHONY: install test demo compile-check bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m livr_kernels.compile_check
	$(BIN)/python -m pytest tests -n 2 --timeout 900

demo: $(STAMP)
	$(BIN)/livr-train --demo --output-dir demo_out --overwrite

compile-check: $(STAMP)
	$(BIN)/python -m livr_kernels.compile_check

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks
