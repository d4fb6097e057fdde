# Two commands do everything on a fresh machine (Python 3.11, pip, gcc, make):
#   make nightly   set up, then run the nightly job for a demo day on the embedded default (local files + DuckDB)
#   make test      set up, then run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATE ?= 2025-06-01
DAYS ?= 1
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# The pseudonymization key never lives in the repo or the data folder (GB/T 35273 §6.2). In production set
# ZQ_PSEUDONYM_KEY from your secret store; for the demo a random key is made once, outside both.
KEYFILE ?= $(HOME)/.config/zhaoqing-public-data/demo-pseudonym.key
WITH_KEY = ZQ_PSEUDONYM_KEY="$${ZQ_PSEUDONYM_KEY:-$$(cat $(KEYFILE))}"
DBT_MANIFEST := dbt_project/target/manifest.json
# The links the UI shows to the published folder (Data Docs, column lineage) are written when a night runs: they point
# where `make ui` serves that folder, so a night of `make nightly` opens with one click in `make ui` too.
DOCS_PORT := 3001
WITH_DOCS_URL = ZQ_DOCS_BASE_URL="$${ZQ_DOCS_BASE_URL:-http://127.0.0.1:$(DOCS_PORT)}"

.PHONY: setup nightly test ui bench dbt-parse clean test-services history distributed

setup: $(STAMP) $(DBT_MANIFEST) $(DAGSTER_HOME)/dagster.yaml

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# The dbt manifest is built once here, never parsed at import time.
$(DBT_MANIFEST): $(STAMP) $(shell find dbt_project -name '*.sql' -o -name '*.yml' 2>/dev/null | grep -v -e target/ -e logs/)
	$(BIN)/python -m assets.dbt_common
	touch $@

dbt-parse: $(DBT_MANIFEST)

# The instance settings (run queue, one slot per warehouse pool) follow the repo's copy.
# The instance's storages are created once, under a lock (orchestration/instance.py), before anything else opens it.
$(DAGSTER_HOME)/dagster.yaml: orchestration/dagster.yaml $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	cp orchestration/dagster.yaml $@
	$(BIN)/python -m orchestration.instance

nightly: setup $(KEYFILE)
	$(WITH_DOCS_URL) $(WITH_KEY) $(BIN)/zq nightly --date $(DATE) --days $(DAYS)

$(KEYFILE):
	mkdir -p $(dir $@)
	umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_hex(32))" > $@

# The test files run on TEST_WORKERS pytest-xdist workers, one file per worker at a time (its module fixtures are built
# once), the longest files first (tests/conftest.py). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup test-services
	$(BIN)/pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# What the tests start themselves needs its programs, from Debian's packages: PostgreSQL (the operational DB in
# production mode; the tests start their own server on loopback), Redis (the Celery broker of the distributed
# tests) and Chromium (the governance reports opened offline,
# driven by Playwright without its own browser download). Installed when missing and we may (root).
test-services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
	      echo "warning: could not install$$missing; their tests will be skipped (CI fails the PostgreSQL ones)"; \
	  else echo "note:$$missing not installed; their tests are skipped"; fi; \
	fi

# The production mode on this machine (issue 16): PostgreSQL, Redis (Debian's packages, installed when missing and
# root), an S3 stand-in and two Celery workers on loopback; a backfill of DIST_DAYS days (in parallel on the two
# workers), its summary; everything it started is stopped again, also on failure or Ctrl-C (orchestration/distributed.py).
DIST_DAYS ?= 3
distributed: setup $(KEYFILE)
	$(WITH_KEY) $(BIN)/python -m orchestration.distributed --date $(DATE) --days $(DIST_DAYS)

# The documentation of the published folder (GX Data Docs, the column-lineage page) is served on 127.0.0.1:3001 while the
# UI runs, so the UI's links open with one click (a browser does not follow file:// links from an http:// page). Only the
# documentation: the snapshots and consumer deliveries in the same folder are read through `zq deliver` (zqdata.docs_server).
DOCS_DIR = $${ZQ_DATA_DIR:-$(CURDIR)/.data}/published
ui: setup $(KEYFILE)
	@mkdir -p "$(DOCS_DIR)"; \
	$(BIN)/python -m zqdata.docs_server --port $(DOCS_PORT) --bind 127.0.0.1 --directory "$(DOCS_DIR)" >/dev/null 2>&1 & docs=$$!; \
	trap 'kill $$docs 2>/dev/null' EXIT INT TERM; \
	$(WITH_DOCS_URL) $(WITH_KEY) $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# A year of small daily deliveries (ZQ_SIM_ROWS_PER_DAY, default here 1,000) through the nightly job, then the governance
# reports of the periods it covers (disclosure and evaluation of 2025, the quarters, the compliance matrix).
# `make history DAYS=30` for a shorter stretch. The nights run as range runs of up to 10 M rows each (a year of 1,000-row
# days: one run; orchestration.ranges.range_days_for, issue 15); a failed range is run again in halves.
history: setup $(KEYFILE)
	ZQ_SIM_ROWS_PER_DAY=$${ZQ_SIM_ROWS_PER_DAY:-1000} $(WITH_DOCS_URL) $(WITH_KEY) $(BIN)/zq history --start 2025-05-01 \
	  --days $(if $(filter command line,$(origin DAYS)),$(DAYS),365)

bench: setup $(KEYFILE)
	$(WITH_KEY) $(BIN)/python -m bench.run $(if $(SIZES),--sizes $(SIZES)) $(if $(BENCH_DAYS),--days $(BENCH_DAYS))

clean:
	rm -rf .data $(DAGSTER_HOME) dbt_project/target dbt_project/logs
