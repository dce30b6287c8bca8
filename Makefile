# Every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Opens the window; `$(BIN)/python -m app.demo --headless` runs it without one.
demo: $(STAMP)
	$(BIN)/python -m app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/bench_tunnel.py

clean:
	rm -rf $(VENV) build *.egg-info
