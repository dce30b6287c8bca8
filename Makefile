# Every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck bench clean package package-test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

PACKAGE_STAMP := $(VENV)/.installed-package
$(PACKAGE_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,package]'
	touch $(PACKAGE_STAMP)

# Opens the window; `$(BIN)/python -m app.demo --headless` runs it without one.
demo: $(STAMP)
	$(BIN)/python -m app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/bench_tunnel.py

# The bundle and this OS's installers in dist/ (installer/build.py; docs/packaging.md).
package: $(PACKAGE_STAMP)
	$(BIN)/python installer/build.py

# Builds with make package, then tests the bundle, the .deb and the NSIS script (Linux, as root for dpkg).
package-test: $(PACKAGE_STAMP)
	DESKBRIDGE_PACKAGING_TESTS=1 $(BIN)/python -m pytest -q tests/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info
