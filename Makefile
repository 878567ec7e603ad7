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

.PHONY: demo test lint typecheck lock clean

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

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Strict for the engine, its providers and money (pyproject.toml's [tool.mypy] overrides).
typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy routing/engine routing/providers core/money.py

# Re-resolve the lock files after editing pyproject.toml (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --python-version 3.11 --universal --generate-hashes --no-header -o requirements/runtime.lock
	uv pip compile pyproject.toml --extra dev --extra bench --python-version 3.11 --universal --generate-hashes --no-header -o requirements/dev.lock

clean:
	rm -rf $(VENV) var
