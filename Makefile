# ExpertMesh developer entry points. `make run` and `make test` each work on a fresh machine
# (Python 3.11 + pip): they create .venv as needed, installing torch's CPU build first through
# a pip constraints file so no CUDA wheels are ever pulled (CUDA hosts: CONSTRAINTS=constraints-cuda.txt).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
PYTEST_ARGS ?=

export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
# EXPERTMESH_HOME passes through when set; else recipes get the CLI's own default ($EXPERTMESH_HOME, else
# ~/.cache/expertmesh; expertmesh/home.py), so `make run` and a hand-run `expertmesh` use the same zoo and cluster.
EXPERTMESH_HOME ?= $(shell $(BIN)/python -c 'from expertmesh.home import expertmesh_home; print(expertmesh_home())')
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup proto prometheus run zoo report profile serve chart test test-unit clean

PROTO_SRC := proto/expertmesh/v1/inspection.proto
PROTO_OUT := expertmesh/v1/inspection_pb2.py

setup: $(VENV)/.installed $(PROTO_OUT)

## Python stubs are generated from the .proto by the build (never edited, never committed).
proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else "ExpertMesh needs Python 3.11 or 3.12; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

## The main job on the embedded default CoE (pcb-aoi): build the zoo, print the accuracy report, profile the
## experts, bring up a 3-node Ray cluster on loopback (60 MiB of expert memory per node, so the plan must split
## the experts), plan the placement on it (--explain), serve with the plan and the placement controller, run a
## 20 s station over gRPC, print the station's figures and the expert hit rates from Prometheus, stop cleanly and
## take the cluster down. NODES=1 serves on one local Ray node instead.
NODES ?= 3
NODE_MEMORY_GB ?= 0.06
SERVE_RUN := --station-seconds 20 --station-rate 10 --stop-after-station --device-idle-s 5 --host-idle-s 10
run: zoo report profile prometheus
ifeq ($(NODES),1)
	$(BIN)/expertmesh serve $(SERVE_RUN)
else
	@$(BIN)/expertmesh down >/dev/null
	$(BIN)/expertmesh up --nodes $(NODES) --node-memory-gb $(NODE_MEMORY_GB)
	$(BIN)/expertmesh plan --explain --json $(EXPERTMESH_HOME)/plan.json || { $(BIN)/expertmesh down; exit 1; }
	$(BIN)/expertmesh serve --address local --plan $(EXPERTMESH_HOME)/plan.json --replan $(SERVE_RUN); \
	  rc=$$?; $(BIN)/expertmesh down; exit $$rc
endif

## Serve the default CoE until Ctrl-C (gRPC :9000, HTTP :8000; dev tokens under $(EXPERTMESH_HOME)).
serve: zoo
	$(BIN)/expertmesh serve

zoo: setup
	$(BIN)/expertmesh zoo build

## Profile every expert (skips current entries); serving takes batch sizes and autoscaling targets from it.
profile: zoo
	$(BIN)/expertmesh profile

report: setup
	$(BIN)/expertmesh zoo report --min-router-accuracy 0.99 --min-verdict-accuracy 0.95

## Prometheus (Debian package) for the metrics test and `make run`: installed with apt-get when missing and
## this user can (root, or password-less sudo); otherwise a note, and the test skips (fails under CI=true).
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "note: no apt-get; install Prometheus to run the metrics test"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "note: cannot install Prometheus without root (apt-get install prometheus); the metrics test will skip"; fi

## Refresh what the Helm chart bundles from the code: the Serve config of the embedded pcb-aoi CoE (serveConfigV2)
## and the Grafana dashboard. tests/test_helm.py fails when they are stale.
chart: setup
	$(BIN)/expertmesh config --zoo /models/zoo/pcb-aoi --tokens /etc/expertmesh/tokens/tokens.yaml --no-profile \
	  --http-host 0.0.0.0 --out helm/expertmesh/files/serve-config.yaml
	$(BIN)/expertmesh dashboard --out helm/expertmesh/dashboards/expertmesh-dashboard.json

## Every test (unit and integration); CI runs exactly this. The serving tests run the real default zoo,
## so it is built first (no baseline; current checkpoints are skipped).
test: setup prometheus
	$(BIN)/expertmesh zoo build --no-baseline --no-progress
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .expertmesh .pytest_cache build *.egg-info expertmesh/v1/inspection_pb2*

## Every figure the README quotes, measured again: each group's command writes docs/figures/<group>.json (with the
## commit and date it measured), then the README's figure blocks are rendered from those files
## (tests/test_readme_figures.py fails when they disagree). FIGURES picks groups: accuracy profile plan (minutes, no
## Ray), router_overhead make_run node_loss (start Ray and serve), ci (a clean clone's `bash .ci/run`, ~15 min).
## `.venv/bin/python bench/figures.py render` only re-renders the README from the committed files.
FIGURES ?= all
.PHONY: figures
figures: zoo
	$(BIN)/python bench/figures.py refresh $(FIGURES)
