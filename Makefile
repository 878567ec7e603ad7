# CascadeFlow — the two commands a newcomer needs:
#   make demo   run the product on embedded defaults (SQLite, no Redis, offline demo models)
#   make test   install the dev dependencies and run the whole test suite
# Installs use the hash-pinned lock files in requirements/ (pip --require-hashes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: demo test test-fast lint typecheck lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-installed: requirements/runtime.lock | $(PY)
	$(PIP) install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/runtime.lock
	@touch $@

$(VENV)/.dev-installed: requirements/dev.lock | $(PY)
	$(PIP) install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/dev.lock
	@touch $@ $(VENV)/.runtime-installed

demo: $(VENV)/.runtime-installed
	$(PY) -m demo.server

test: $(VENV)/.dev-installed
	$(PY) -m pytest $(PYTEST_ARGS)

# What CI checks before the tests: style, import contracts (.importlinter), types.
lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(MAKE) --no-print-directory typecheck

# mypy: strict on the engine and providers, the rest against the baseline in pyproject.toml.
typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

# The suite without the browser test and the slow ones (CI runs everything: make test).
test-fast: $(VENV)/.dev-installed
	$(PY) -m pytest -m "not browser and not slow" $(PYTEST_ARGS)

# Re-resolve the lock files after editing pyproject.toml (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --python-version 3.11 --universal --generate-hashes --no-header -o requirements/runtime.lock
	uv pip compile pyproject.toml --extra dev --extra bench --python-version 3.11 --universal --generate-hashes --no-header -o requirements/dev.lock

clean:
	rm -rf $(VENV) var
