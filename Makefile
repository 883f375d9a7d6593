# Two commands for a fresh machine: `make demo` (the main job: serve the demo model on an
# embedded Redis and stream a completion) and `make test`.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch by default (small, and what CI runs); GPU users: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup test demo lint services bench-cpu

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[all,test]"  # every role's extra (README: what to install where)
	touch $@

services:
	bash scripts/ensure_services.sh

test: setup services
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check mii tests scripts
	$(VENV)/bin/ruff format --check mii tests scripts

demo: setup
	$(VENV)/bin/mii serve smollm2 --chat --prompt "What is the capital of France?"

bench-cpu: setup
	$(PY) scripts/bench_cpu.py --json bench_cpu.json
