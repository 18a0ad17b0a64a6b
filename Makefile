# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# One venv, two layers: running needs requirements-local.txt; `make test` adds the test tools
# and the real backends' clients (requirements.txt's boto3 and convex).
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PORT ?= 8000
# Whose dev token `make token` mints. Not USER: the shell sets that to your login name.
USER_ID ?= user_local

.PHONY: help run test lint typecheck pytest vitest setup setup-run clean token fuzz convex-deploy convex-deploy-check
.DEFAULT_GOAL := help

## List these commands.
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-z][a-z-]*:/ && doc {sub(/:.*/,""); \
		printf "  make %-13s %s\n", $$0, doc} !/^\.PHONY/{doc=""}' $(MAKEFILE_LIST)

# Each layer is reinstalled whenever one of its requirements files changes. --no-compile: pip
# would byte-compile every module up front (half of a first `make run`'s 60 s); Python compiles
# what it imports, on first import, instead.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check --no-compile

# Said on stderr, not echoed on stdout: `TOKEN=$$(make token)` must capture the token alone, even
# on the first run or after a requirements change, when this layer installs first.
$(RUN_STAMP): requirements.txt requirements-local.txt
	@echo "Installing what running needs into $(VENV) (requirements-local.txt)" >&2
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) >&2
	@$(PIP_INSTALL) -r requirements-local.txt >&2
	@touch $@

$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP)

# What `make run` installs on a fresh clone: the gateway and its local stand-ins, no test tools.
setup-run: $(RUN_STAMP)

# uvicorn binds its port only once the app has started, so a taken port would be reported
# after "Application startup complete", in words about errno. Check first, and say what to do.
define PORT_CHECK
import socket, sys
if not sys.argv[1].isdigit() or not 0 < int(sys.argv[1]) < 65536:
    sys.exit(f"PORT must be a number from 1 to 65535, not {sys.argv[1]!r}: make run PORT=8001")
port = int(sys.argv[1])
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sys.exit(f"Port {port} is in use: stop what holds it, or run on another with make run PORT={port + 1}")
endef
export PORT_CHECK

## Start the gateway on the embedded defaults; another port: make run PORT=8001
run: $(RUN_STAMP)
	@$(BIN)/python -c "$$PORT_CHECK" "$(PORT)"
	PUBLIC_BASE_URL=$${PUBLIC_BASE_URL:-http://127.0.0.1:$(PORT)} \
		$(BIN)/uvicorn main:app --host 127.0.0.1 --port $(PORT)

## Mint a dev token: make token USER_ID=user_alice (default user_local)
token: $(RUN_STAMP)
ifeq ($(origin USER),command line)
	$(error make token takes USER_ID=..., not USER= (your shell's login name): make token USER_ID=$(USER))
endif
	@$(BIN)/python manage.py mint-token $(USER_ID)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/black --check --quiet .

# One run from the dev venv covers worker/ too: its pins (av, httpx, pydantic) are the gateway's,
# and its one other package, the RunPod SDK, has no types to check against.
## Type-check the gateway, bench/, tests/ and worker/ with mypy --strict (pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

# The contract and end-to-end suites start the Convex test server, so they need node_modules.
pytest: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest --cov --cov-report=term

vitest: $(NODE_STAMP)
	npm run typecheck
	npm test
	npm run test:server

## Install everything, then lint, type-check and run every test.
test: lint typecheck vitest pytest test-worker

## /docs, /redoc and the playground of a real gateway in headless Chromium (Debian's, installed if missing).
.PHONY: test-browser
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/pytest -m browser

## Fuzz the API with schemathesis (fixed seed, 90 s bound): no 5xx, every answer matches the schema.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz_api

## Push the Convex side to production: CONVEX_DEPLOY_KEY (prod:...) and CLERK_ISSUER must be set.
# The issuer goes on the deployment first: a push whose auth.config.ts reads an unset variable
# is refused (convex-backend crates/isolate/src/environment/auth_config.rs). With a deployment's
# deploy key in CONVEX_DEPLOY_KEY, `env set` and `deploy` both act on that deployment, and
# --prod is ignored (convex npm package, src/cli/lib/deploymentSelection.ts).
convex-deploy: convex-deploy-check $(NODE_STAMP)
	npx convex env set CLERK_JWT_ISSUER_DOMAIN "$$CLERK_ISSUER"
	npx convex deploy

# Refuse before touching anything, naming every missing setting at once.
convex-deploy-check:
	@missing=""; \
	case "$$CONVEX_DEPLOY_KEY" in \
	  prod:*\|*) ;; \
	  "") missing="$$missing\n  CONVEX_DEPLOY_KEY: the production deploy key (Dashboard -> Settings -> Deploy keys)";; \
	  *) missing="$$missing\n  CONVEX_DEPLOY_KEY: not a production deploy key (prod:<deployment>|...)";; \
	esac; \
	case "$$CLERK_ISSUER" in \
	  https://*) ;; \
	  "") missing="$$missing\n  CLERK_ISSUER: Clerk's Frontend API URL, e.g. https://clerk.cineweave.ai";; \
	  *) missing="$$missing\n  CLERK_ISSUER: must be an https URL";; \
	esac; \
	if [ -n "$$missing" ]; then printf "convex-deploy: nothing done; set:$$missing\n" >&2; exit 2; fi

clean:
	rm -rf $(VENV) .venv-serve worker/.venv node_modules .data .coverage htmlcov .pytest_cache .ruff_cache .mypy_cache

# --- The RunPod worker: worker/ -----------------------------------------------------------------
WORKER_VENV := worker/.venv
WORKER_STAMP := $(WORKER_VENV)/.installed

# Built from the worker's own requirements alone, as its image (or a fresh machine) would be.
$(WORKER_STAMP): worker/requirements.txt worker/requirements-test.txt
	test -x $(WORKER_VENV)/bin/python || $(PYTHON) -m venv $(WORKER_VENV)
	$(WORKER_VENV)/bin/pip install --quiet --disable-pip-version-check -r worker/requirements-test.txt
	touch $@

## Run the worker's tests (worker/tests) from its own venv.
.PHONY: test-worker
test-worker: $(WORKER_STAMP)
	cd worker && .venv/bin/pytest

# --- Benchmarks: bench/, BENCHMARKS.md ---------------------------------------------------------
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: bench bench-smoke bench-streams

# matplotlib for the plot, on top of the dev venv; rebuilt when either changes.
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# The servers under test run from a venv with requirements.txt only, as the container ships:
# the dev venv's extra packages change what the gateway imports (httpx loads its command-line
# tool's rich and click when they are installed), and so its cold start and memory.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

$(SERVE_STAMP): requirements.txt
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

## Measure the gateway against a bare FastAPI app (about 13 min): BENCHMARKS.md, bench/latency.png.
# node_modules: production mode runs the Convex imitation (tests/convex_server/server.mjs).
bench: $(BENCH_STAMP) $(SERVE_STAMP) $(NODE_STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || true
	BENCH_COMMAND="make bench" $(BIN)/python -m bench.run --server-python $(SERVE_VENV)/bin/python

## Prove the harness still works: 1 s runs at 1 connection, written to a temp dir (no timings asserted).
bench-smoke: $(BENCH_STAMP) $(SERVE_STAMP) $(NODE_STAMP)
	out=$$(mktemp -d) && BENCH_COMMAND="make bench-smoke" \
		$(BIN)/python -m bench.run --quick --server-python $(SERVE_VENV)/bin/python \
		--output $$out/BENCHMARKS.md --plot $$out/latency.png \
		--results $$out/results.json

## 1,000 open event streams on one gateway: memory, store reads, CPU, delay (bench/STREAMS.md).
bench-streams: $(STAMP)
	$(BIN)/python -m bench.streams
