# pgcorral developer tasks.  `make test` needs nothing but python3 (with venv)
# and the PostgreSQL server binaries: the tests start their own cluster.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv lint test run bench clean

venv: $(STAMP)

# Re-run the install only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if [ ! -x $(VPY) ]; then \
	    echo "creating $(VENV) with $(PYTHON)"; \
	    if ! $(PYTHON) -m venv $(VENV); then \
	        echo "'$(PYTHON) -m venv' failed (ensurepip missing?); retrying without pip" >&2; \
	        rm -rf $(VENV); \
	        $(PYTHON) -m venv --without-pip $(VENV) || { \
	            echo "ERROR: cannot create a virtualenv with $(PYTHON)." >&2; \
	            echo "       On Debian/Ubuntu: apt-get install python3-venv" >&2; \
	            rm -rf $(VENV); exit 1; }; \
	    fi; \
	fi
	@if ! $(VPY) -m pip --version >/dev/null 2>&1; then \
	    $(VPY) -m ensurepip --upgrade >/dev/null 2>&1 \
	    || $(PYTHON) -m pip --python $(VPY) install -q pip >/dev/null 2>&1 \
	    || { echo "ERROR: $(VENV) has no pip and it cannot be bootstrapped" \
	              "(no ensurepip, no usable system pip)." >&2; \
	         echo "       On Debian/Ubuntu: apt-get install python3-venv" >&2; \
	         rm -rf $(VENV); exit 1; }; \
	fi
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests bench devtools
	$(VENV)/bin/mypy

# The whole suite with one worker process, then the integration suite again with two
# (tests marked single_worker assert reuse within one process's pool; see pyproject.toml).
test: lint
	$(VENV)/bin/pytest -q
	PGCORRAL_TEST_WORKERS=2 $(VENV)/bin/pytest -q -m "integration and not single_worker" \
	    tests/integration

run: venv
	$(VPY) devtools/run_dev.py

bench: venv
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
