# The two commands of the README, and the checks CI runs.
#   make demo   the whole loop on this machine (`edgefleet demo`, docs/quickstart.md), in its own
#               virtual environment (.venv-demo); DEMO_ARGS="--keep" keeps the fleet running
#   make test   the test suite, in its own virtual environment (.venv-test)
#   make lint   ruff, mypy and the import contracts (CI runs it after the tests)
#   make dist   the wheel and the sdist in dist/ (what a device installs: docs/agent.md)

PYTHON ?= python3
DEMO_VENV := .venv-demo
TEST_VENV := .venv-test
DIST_VENV := .venv-dist
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint format typecheck bench dist clean

$(DEMO_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet '.[all]' scikit-learn
	touch $@

$(TEST_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/python -m pip install --quiet -e '.[all,dev]'
	touch $@

$(DIST_VENV)/.installed:
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install --quiet --upgrade pip build
	touch $@

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall .
	$(DEMO_VENV)/bin/edgefleet demo $(DEMO_ARGS)

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# mypy and lint-imports cannot follow setuptools' package-dir mapping (agent/ ->
# edgefleet.agent), so they check a tree of links laid out as the installed package is.
typecheck: $(TEST_VENV)/.installed
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs "$(CURDIR)/edgefleet" build/typecheck/edgefleet
	for part in agent server converter client; do cp -rs "$(CURDIR)/$$part" build/typecheck/edgefleet/$$part; done
	cp -rs "$(CURDIR)/tests" build/typecheck/tests
	cd build/typecheck && "$(CURDIR)/$(TEST_VENV)/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" edgefleet tests

lint: $(TEST_VENV)/.installed typecheck
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/ruff format --check .
	cd build/typecheck && "$(CURDIR)/$(TEST_VENV)/bin/lint-imports" --no-cache "$(CURDIR)/pyproject.toml"

format: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check --fix .
	$(TEST_VENV)/bin/ruff format .

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/verify_bundle.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/install_bundle.py
	$(TEST_VENV)/bin/python bench/convert_models.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/predictor.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/server_ingest.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/server_notify.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/server_devices_list.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/rollout_status.py
	PYTHONPATH=. $(TEST_VENV)/bin/python bench/web_pages.py
	$(TEST_VENV)/bin/python bench/drift.py
	$(TEST_VENV)/bin/python bench/drift_reference_size.py

# `python -m build`: the sdist, then the wheel built from it (so the sdist is complete).
dist: $(DIST_VENV)/.installed
	rm -rf dist
	$(DIST_VENV)/bin/python -m build --outdir dist .

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) $(DIST_VENV) build dist
