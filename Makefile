# The one task runner: the README, CI (.ci/run) and developers all call these targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES ?= kafka nats redis postgres jaeger
# SECURE=1: `make up` also starts the secured variants (scripts/secure_services.py, docs/
# security.md): Kafka SASL_SSL+SCRAM on 9192, NATS TLS+nkey on 4322, Redis TLS on 6380,
# PostgreSQL TLS on 5433, certificates from a local CA in .run/secure.
SECURE ?=
# CLUSTER=3: `make up` starts a three-node Kafka (KRaft) and a three-node NATS JetStream
# cluster instead (scripts/cluster.py, docs/operations.md); `make down` stops both kinds.
CLUSTER ?= 1
PYTEST_ARGS ?=
PACKAGES := schemas producer consumer jobstream

.DEFAULT_GOAL := help
.PHONY: chaos chaos-outbox chaos-cluster test-cluster openapi openapi-check helm htmx chromium demo fmt-check schemas help venv up down status test test-unit check fmt lint types imports schemas-check bench lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "python3 not found: install python3 (3.11+) and python3-venv"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "python 3.11+ required, found $$($(PYTHON) --version)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@PIP_CACHE_DIR=.cache/pip $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(BIN)/.installed ## create or update the virtualenv (pinned by constraints.txt)

up: venv ## start Kafka, NATS, Redis, PostgreSQL and Jaeger on 127.0.0.1 (reuses what runs); SECURE=1 adds the secured variants; CLUSTER=3: 3-node Kafka and NATS clusters instead
	@case "$(CLUSTER)" in \
	  1) $(BIN)/python scripts/services.py up $(SERVICES) ;; \
	  3) $(BIN)/python scripts/cluster.py up kafka nats ;; \
	  *) echo "error: CLUSTER must be 1 (single brokers) or 3 (three-node clusters), got '$(CLUSTER)'"; exit 2 ;; \
	esac
	@if test -n "$(SECURE)"; then $(BIN)/python scripts/secure_services.py up; fi

down: ## stop every local service, secured variant and cluster node; leaves no process behind
	@py=$(BIN)/python; test -x $$py || py=$(PYTHON); $$py scripts/services.py down; $$py scripts/cluster.py down
	@if test -x $(BIN)/python; then $(BIN)/python scripts/secure_services.py down; fi

status: venv ## say which local services run
	@$(BIN)/python scripts/services.py status

DEMO_TRANSPORT ?= kafka
DEMO_ARGS ?=
JAEGER_URL := http://127.0.0.1:16686
# Jaeger is built from source once (scripts/jaeger.sh: minutes on a fresh machine, then
# cached): the build runs in the background while the brokers start, with a progress line
# every 15 s, and Jaeger starts once it is built. DEMO_ARGS=--hold keeps everything running
# after the summary (the Jaeger and dashboard URLs) until Enter.
demo: venv ## the main job: brokers, ingress with /ui, 2 workers, Jaeger; jobs over HTTP; a retried job's trace
	@mkdir -p .run && scripts/htmx.sh >/dev/null || echo "htmx not fetched (npm missing?): the dashboard works without live refresh"
	@bash scripts/jaeger.sh >.run/jaeger-build.log 2>&1 & build=$$!; started=$$(date +%s); \
	  $(MAKE) --no-print-directory up SERVICES="$(DEMO_TRANSPORT) redis" || { kill $$build 2>/dev/null; exit 1; }; \
	  while kill -0 $$build 2>/dev/null; do \
	    echo "building Jaeger from source (once; 6-7 minutes on a fresh machine): $$(( $$(date +%s) - started ))s so far, log in .run/jaeger-build.log"; \
	    for _ in $$(seq 15); do kill -0 $$build 2>/dev/null || break; sleep 1; done; \
	  done; \
	  wait $$build || { tail -n 20 .run/jaeger-build.log; echo "error: the Jaeger build failed (above)"; $(MAKE) --no-print-directory down >/dev/null; exit 1; }
	@$(MAKE) --no-print-directory up SERVICES=jaeger || { $(MAKE) --no-print-directory down >/dev/null; exit 1; }
	@status=0; $(BIN)/python -m examples.demo --transport $(DEMO_TRANSPORT) --jaeger $(JAEGER_URL) $(DEMO_ARGS) || status=$$?; \
	  $(MAKE) --no-print-directory down >/dev/null; exit $$status

htmx: ## fetch the pinned htmx file the dashboard serves into .cache/htmx (npm, once)
	@scripts/htmx.sh

chromium: ## unpack Debian's chromium for the browser tests into .cache/chromium (once)
	@scripts/chromium.sh

helm: ## build helm once into .cache/bin (for the chart tests)
	@scripts/helm.sh >/dev/null

test: up helm htmx chromium ## the whole suite: unit, integration and browser tests against the real services
	@$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv helm ## unit tests only (no brokers)
	@$(BIN)/pytest -m 'not integration' $(PYTEST_ARGS)

check: venv fmt-check lint types imports schemas-check openapi-check ## format, lint, types, import contract, schema export

fmt: venv ## reformat the code
	@$(BIN)/ruff format .
	@$(BIN)/ruff check --fix .

fmt-check:
	@$(BIN)/ruff format --check .

lint: venv
	@$(BIN)/ruff check .

types: venv
	@$(BIN)/mypy $(PACKAGES)

imports: venv
	@$(BIN)/lint-imports

schemas-check: venv ## the checked-in JSON Schemas match the job models
	@$(BIN)/jobstream schemas export --check

openapi-check: venv ## docs/openapi.json matches the ingress
	@JOBSTREAM_STATUS__BACKEND=memory $(BIN)/jobstream ingress --openapi | diff -q - docs/openapi.json >/dev/null \
	  || { echo "docs/openapi.json is stale: run make openapi"; exit 1; }

openapi: venv ## regenerate docs/openapi.json
	@JOBSTREAM_STATUS__BACKEND=memory $(BIN)/jobstream ingress --openapi > docs/openapi.json

schemas: venv ## regenerate schemas/jsonschema/ from the job models
	@$(BIN)/jobstream schemas export

chaos: up ## 3 workers, 20 SIGKILLs, a broker and a store restart during 20,000 jobs (Kafka, NATS)
	@$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

chaos-outbox: up ## the outbox and transactional handlers: 10 relay and 20 worker SIGKILLs during 20,000 jobs (Kafka, NATS)
	@$(BIN)/python -m tests.chaos_outbox --private --worker-kills 20 --rate 200 $(CHAOS_ARGS)

test-cluster: up ## the cluster failover tests alone (own 3-node clusters on private ports; also in `make test`)
	@$(BIN)/pytest tests/integration/test_cluster_kafka.py tests/integration/test_cluster_nats.py $(PYTEST_ARGS)

chaos-cluster: up ## leader kills, a rolling restart during 20,000 jobs on 3-node clusters (prints figures)
	@$(BIN)/python -m tests.cluster $(CLUSTER_ARGS)

$(BIN)/.bench-installed: $(BIN)/.installed
	@PIP_CACHE_DIR=.cache/pip $(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	@touch $@

bench: up $(BIN)/.bench-installed ## run the benchmarks (raw clients, FastStream, latency; prints ratios)
	@status=0; for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || status=1; done; exit $$status

lock: ## re-resolve constraints.txt from pyproject.toml in a scratch virtualenv
	@rm -rf .cache/lockenv && $(PYTHON) -m venv .cache/lockenv
	@.cache/lockenv/bin/pip install -q -e '.[dev,bench]'
	@.cache/lockenv/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt
	@rm -rf .cache/lockenv && echo "constraints.txt updated"

clean: down ## stop services and remove the run state (keeps the download caches)
	@rm -rf .run
