# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned dependencies when they are missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | md5sum | cut -c1-8)

.PHONY: demo test test-gpu lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/vlm-bridge demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# On a CUDA machine (GPU tests are skipped elsewhere).
test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m gpu tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
