# pgcorral developer tasks.  `make test` needs nothing but python3 (with venv)
# and the PostgreSQL server binaries: the tests start their own cluster.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv build lint test test-compiled smoke-pure wheel run bench clean

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
	PGCORRAL_BUILD=pure $(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# Compile the hot modules (pgcorral.build.COMPILED) with mypyc, in place: the .so files sit
# beside the .py files in src/ and Python imports them first.  Rebuilt when any source
# changes; `pgcorral -V` and the test header say which build runs (and whether it is stale).
# PGCORRAL_BUILD=compiled: a compile failure fails here instead of falling back.
BUILD_STAMP := build/.inplace
PY_SOURCES  := $(shell find src/pgcorral -name '*.py')

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(STAMP) setup.py $(PY_SOURCES)
	@# mypyc's incremental build sometimes dies in its code generator ("ValueError: value is
	@# not in list") after an edit; a build from a clean cache then works: retry once so.
	PGCORRAL_BUILD=compiled $(VPY) setup.py -q build_ext --inplace \
	    || { echo "retrying the compile from a clean mypyc cache" >&2; \
	         rm -rf build/pgcorral build/temp.* .mypy_cache; \
	         PGCORRAL_BUILD=compiled $(VPY) setup.py -q build_ext --inplace; }
	@# build_ext leaves a module it found up to date (same C) untouched: after a good build
	@# every .so is current, so mark them so (pgcorral.build's stale check compares mtimes).
	find src/pgcorral -name '*.so' -exec touch {} +
	@mkdir -p build && touch $(BUILD_STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests bench devtools
	$(VENV)/bin/mypy

# The whole suite on the compiled build with one worker process, then the integration suite
# again with two (tests marked single_worker assert reuse within one process's pool; see
# pyproject.toml); then the wheel and the pure-Python fallback.
test: lint test-compiled wheel smoke-pure

test-compiled: build
	PGCORRAL_EXPECT_BUILD=compiled $(VENV)/bin/pytest -q
	PGCORRAL_EXPECT_BUILD=compiled PGCORRAL_TEST_WORKERS=2 $(VENV)/bin/pytest -q \
	    -m "integration and not single_worker" tests/integration tests/ha/test_routing.py

# `python -m build` (isolated, as a user's pip would; the wheel is built from the sdist, so
# nothing of the in-place build is reused): the wheel must carry compiled modules, and
# installed on its own it must say so.
wheel: venv
	rm -rf dist build/wheel-check
	$(VPY) -m build --outdir dist . >build-wheel.log 2>&1 \
	    || { tail -30 build-wheel.log; exit 1; }
	$(VPY) -m pip install -q --no-deps --target build/wheel-check dist/*.whl
	@# (not `tee /dev/stderr`: when stderr is a log file, tee truncates it)
	v=$$(PYTHONPATH=build/wheel-check $(VPY) -m pgcorral -V) && echo "$$v" \
	    && echo "$$v" | grep -q "(compiled with mypyc)"

# The fallback: built where no C compiler works (CC=false), pgcorral installs as pure Python,
# says so, and passes a smoke run of the suite.
SMOKE_TESTS := tests/unit tests/integration/test_session_pooling.py \
               tests/integration/test_transaction.py tests/integration/test_daemon.py \
               tests/integration/test_tls_clients.py
smoke-pure: venv
	rm -rf build/pure build/pure-src && mkdir -p build/pure-src
	tar -c --exclude=./build --exclude=./dist --exclude=./.venv --exclude=./.git \
	    --exclude='*.so' . | tar -x -C build/pure-src  # the tree without any compiled module
	CC=false $(VPY) -m pip install -v --no-deps --target build/pure build/pure-src \
	    >build-pure.log 2>&1 || { tail -30 build-pure.log; exit 1; }
	grep -q "installing pure Python" build-pure.log
	v=$$(PYTHONPATH=build/pure $(VPY) -m pgcorral -V) && echo "$$v" \
	    && echo "$$v" | grep -q "(pure Python)"
	PYTHONPATH=build/pure PGCORRAL_EXPECT_BUILD=pure $(VENV)/bin/pytest -q -p no:cacheprovider \
	    $(SMOKE_TESTS)

run: venv
	$(VPY) devtools/run_dev.py

bench: venv
	$(VPY) bench/run.py

# The mixing fuzzer's long run (tests/fuzz): its own PostgreSQL and pgcorral (transaction
# mode), 1,000,000 transactions by default. FUZZ_TRANSACTIONS, FUZZ_SECONDS, FUZZ_SEED,
# FUZZ_CLIENTS, FUZZ_WORKERS, FUZZ_POOL, FUZZ_KILL_INTERVAL, FUZZ_OWNER_GUC, FUZZ_KNOWN_BUGS,
# FUZZ_DIRECT: see tests/fuzz/__main__.py.
.PHONY: fuzz
fuzz: build
	PYTHONPATH=src $(VPY) -m tests.fuzz

clean:
	rm -rf $(VENV) build dist build-*.log .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
	find src -name '*.so' -delete

# The soak (tests/soak): the fuzzer's mixes through pgcorral (2 workers) with faults on a
# schedule (backend kills, SIGHUP, a worker's kill -9, a PostgreSQL fast restart, a black-holed
# network), then the figures. SOAK_SECONDS (1800), SOAK_FAULT_INTERVAL, SOAK_SEED, SOAK_WORKERS,
# SOAK_POOL, SOAK_CLIENTS: see tests/soak/soak.py. soak-ci: the 2-minute version CI runs
# (as tests/soak/test_soak.py).
.PHONY: soak soak-ci
soak: build
	PYTHONPATH=src $(VPY) -m tests.soak

soak-ci: build
	SOAK_SECONDS=$${SOAK_SECONDS:-120} PYTHONPATH=src $(VPY) -m tests.soak

# issue 13's Patroni end-to-end run in full (tests/ha/test_patroni.py, docs/HA-TESTING.md): etcd
# and two Patroni nodes on loopback, three kills of the leader's postmaster under load, directly
# and through pgcorral (1, then 2 workers); about 7 minutes. Prints the figures and writes them
# as JSON to HA_REPORT (and HA_REPORT.workers2). `make test` runs only the short variant.
# Needs `apt-get install patroni etcd-server`.
.PHONY: ha-test
HA_REPORT ?= build/ha-report.json
ha-test: build
	PYTHONPATH=src PGCORRAL_HA_TEST=full PGCORRAL_HA_REPORT=$(HA_REPORT) \
	    $(VENV)/bin/pytest -q -p no:cacheprovider tests/ha/test_patroni.py
	PYTHONPATH=src PGCORRAL_HA_TEST=full PGCORRAL_TEST_WORKERS=2 \
	    PGCORRAL_HA_REPORT=$(HA_REPORT).workers2 \
	    $(VENV)/bin/pytest -q -p no:cacheprovider tests/ha/test_patroni.py -k pgcorral
