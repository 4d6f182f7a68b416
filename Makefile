# agentcoord developer targets. `make run` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)
AGENTCOORD_LISTEN ?= 127.0.0.1:50051
AGENTCOORD_STORE ?= sqlite:///var/agentcoord.db
# make run's dashboard and /metrics (only make run's: run-* processes would share the port).
# An empty value turns it off: AGENTCOORD_HTTP_LISTEN= make run
AGENTCOORD_HTTP_LISTEN ?= 127.0.0.1:8080
export AGENTCOORD_LISTEN AGENTCOORD_STORE
# make run-cluster's PostgreSQL database (created if missing) and its replicas' ports.
CLUSTER_STORE ?= postgresql://root@127.0.0.1:5432/agentcoord
CLUSTER_PORTS ?= 50051,50052,50053
# make test's pytest processes (pytest-xdist): most tests wait on servers, timeouts and
# child processes, so two workers halve the suite's time on two cores. TEST_WORKERS=0: one.
TEST_WORKERS ?= 2

.PHONY: venv proto proto-check lint lint-proto fmt typecheck test pytest run run-discovery \
	run-distribution run-statesync run-cluster bench demo demo-cluster clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# setuptools notes every editable install as a BuildBackendWarning ("Editable
	@# installation."): information, not a problem of this project, so it is not shown.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# protoc with the pinned grpcio-tools and mypy-protobuf; $(1) is the output folder.
define generate
	rm -rf $(1) && mkdir -p $(1)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos \
		--python_out=$(1) --mypy_out=$(1) --grpc_python_out=$(1) --mypy_grpc_out=$(1) $(PROTOS)
	find $(1)/agentcoord -mindepth 1 -type d -exec touch {}/__init__.py \;
endef

proto: $(STAMP)
	$(call generate,generated)

proto-check: $(STAMP)
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(MAKE) -s --no-print-directory _generate-into OUT=$$tmp/generated >$$tmp/log 2>&1 \
		|| { cat $$tmp/log; exit 1; }; \
	if ! diff -r -x __pycache__ $$tmp/generated generated; then \
		echo "generated/ is stale: run make proto"; exit 1; fi

_generate-into:
	$(call generate,$(OUT))

lint: $(STAMP) lint-proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

lint-proto:
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --silent --no-audit --no-fund >/dev/null && npx --no-install buf lint protos && echo "buf lint: ok"; \
	else echo "buf lint skipped: npm is not installed (tests/test_protos.py still checks the rules)"; fi

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: proto-check lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) $(ARGS)

pytest: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

run: $(STAMP)
	mkdir -p var
	AGENTCOORD_HTTP_LISTEN=$(AGENTCOORD_HTTP_LISTEN) $(VENV)/bin/agentcoord serve

run-discovery run-statesync: run-%: $(STAMP)
	mkdir -p var
	$(VENV)/bin/agentcoord serve $* --listen $${LISTEN:-$(AGENTCOORD_LISTEN)}

# Distribution judges liveness and renews leases from heartbeats: Discovery comes with it.
run-distribution: $(STAMP)
	mkdir -p var
	$(VENV)/bin/agentcoord serve discovery distribution --listen $${LISTEN:-$(AGENTCOORD_LISTEN)}

# Three replicas on one PostgreSQL database, until Ctrl-C (see docs/operations.md).
run-cluster: $(STAMP)
	$(PY) examples/cluster/run_cluster.py --store '$(CLUSTER_STORE)' --ports '$(CLUSTER_PORTS)' $(ARGS)

# Three replicas, six agents on all three, the leader killed mid-task (see docs/operations.md):
# on a fresh schema of CLUSTER_STORE, dropped at the end.
demo-cluster: $(STAMP)
	$(PY) examples/cluster/demo_cluster.py --store '$(CLUSTER_STORE)'

# Four agents cooperate on an AUTO-split task; one is killed mid-sub-task (see README). On
# its own server, or with AGENTCOORD_SERVER=127.0.0.1:50051 on make run's (its dashboard).
demo: $(STAMP)
	$(PY) examples/demo/run_demo.py

bench: $(STAMP)
	$(PY) -m tests.bench $(ARGS)

clean:
	rm -rf $(VENV) var build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
