# The two newcomer commands (see README): `make demo` and `make test`.
# Both create .venv and install fhirtwin with its test tools on first use.
PYTHON ?= python3
VENV   := .venv
# Generated independent-corpus populations are deterministic per settings: keep them across clones.
export FHIRTWIN_SYNTHEA_CACHE ?= $(HOME)/.cache/fhirtwin/synthea
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint sandbox browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fhirtwin demo

# The end-to-end page tests drive Debian's chromium (no browser download by Playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium from Debian's packages for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/fhirtwin sandbox start
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

sandbox: $(STAMP)
	$(BIN)/fhirtwin sandbox start
