# ExpertMesh developer entry points. `make run` and `make test` each work on a fresh machine
# (Python 3.11 + pip): they create .venv as needed, installing torch's CPU build first through
# a pip constraints file so no CUDA wheels are ever pulled (CUDA hosts: CONSTRAINTS=constraints-cuda.txt).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Where torch comes from when no local wheel of it exists (see setup): PyTorch's own CPU index for the CPU build
# (PyPI has only the CUDA build of torch for Linux x86_64); empty for other constraints (plain PyPI).
TORCH_INDEX_URL ?= $(if $(filter constraints-cpu.txt,$(notdir $(CONSTRAINTS))),https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
# EXPERTMESH_HOME passes through when set; else recipes get the CLI's own default ($EXPERTMESH_HOME, else
# ~/.cache/expertmesh; expertmesh/home.py), so `make run` and a hand-run `expertmesh` use the same zoo and cluster.
EXPERTMESH_HOME ?= $(shell $(BIN)/python -c 'from expertmesh.home import expertmesh_home; print(expertmesh_home())')
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup proto prometheus run run-ports zoo report profile serve chart test test-unit clean

PROTO_SRC := proto/expertmesh/v1/inspection.proto
PROTO_OUT := expertmesh/v1/inspection_pb2.py

setup: $(VENV)/.installed $(PROTO_OUT)

## Python stubs are generated from the .proto by the build (never edited, never committed).
proto: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)

## torch first, offline first: `pip install --no-index --no-deps` takes a local wheel (pip's find-links, e.g. a
## wheelhouse in pip.conf or PIP_FIND_LINKS) without asking any index, then its dependencies come from the
## configured indexes as usual. With no local wheel, pip fetches torch from TORCH_INDEX_URL, with PyPI for the rest.
## Either way the constraints file decides the build (constraints-cpu.txt: torch==2.13.0+cpu).
TORCH_FROM_INDEX = $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"$(if $(TORCH_INDEX_URL), \
  --index-url $(TORCH_INDEX_URL) --extra-index-url https://pypi.org/simple)
VENV_HINT = $(PYTHON) cannot create a virtual environment (no venv/ensurepip module). On Debian/Ubuntu: \
  apt-get install python3-venv (for $(PYTHON) itself: $(shell $(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])' 2>/dev/null)), then run make again
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 11), (3, 12)) else "ExpertMesh needs Python 3.11 or 3.12; set PYTHON=python3.11")'
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "error: $(VENV_HINT)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "error: $(VENV_HINT)" >&2; exit 1; }
	@if $(BIN)/python -m pip install --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION): installed from a local wheel; its dependencies from the configured indexes"; \
	  set -x; $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
	  echo "torch $(TORCH_VERSION): no local wheel; fetching it from $(or $(TORCH_INDEX_URL),the configured indexes)"; \
	  set -x; $(TORCH_FROM_INDEX); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

## The main job on the embedded default CoE (pcb-aoi): build the zoo, print the accuracy report, profile the
## experts, bring up a 3-node Ray cluster on loopback (60 MiB of expert memory per node, so the plan must split
## the experts), plan the placement on it (--explain), serve with the plan and the placement controller, run a
## 20 s station over gRPC, print the station's figures and the expert hit rates from Prometheus, stop cleanly and
## take the cluster down. NODES=1 serves on one local Ray node instead.
## The ports it binds are checked first (run-ports), before the zoo is built: a taken one is named with the variable
## below (and the expertmesh flag it passes) that moves it, e.g. `make run GRPC_PORT=9100`.
NODES ?= 3
NODE_MEMORY_GB ?= 0.06
GRPC_PORT ?= 9000
HTTP_PORT ?= 8000
METRICS_PORT ?= 8080
DASHBOARD_PORT ?= 8265
PROMETHEUS_PORT ?= 9090
SERVE_RUN := --station-seconds 20 --station-rate 10 --stop-after-station --device-idle-s 5 --host-idle-s 10 \
  --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --prometheus-port $(PROMETHEUS_PORT)
run: prometheus run-ports zoo report profile
ifeq ($(NODES),1)
	$(BIN)/expertmesh serve $(SERVE_RUN) --metrics-port $(METRICS_PORT)
else
	@$(BIN)/expertmesh down >/dev/null
	$(BIN)/expertmesh up --nodes $(NODES) --node-memory-gb $(NODE_MEMORY_GB) --metrics-base-port $(METRICS_PORT) \
	  --dashboard-port $(DASHBOARD_PORT)
	$(BIN)/expertmesh plan --explain --json $(EXPERTMESH_HOME)/plan.json || { $(BIN)/expertmesh down; exit 1; }
	$(BIN)/expertmesh serve --address local --plan $(EXPERTMESH_HOME)/plan.json --replan $(SERVE_RUN); \
	  rc=$$?; $(BIN)/expertmesh down; exit $$rc
endif

## The ports `make run` binds must be free (python -m expertmesh.cluster.ports; Prometheus's only when installed).
## A cluster an earlier `make run` left up is taken down first: it holds the metrics and dashboard ports.
run-ports: setup
ifneq ($(NODES),1)
	@$(BIN)/expertmesh down >/dev/null
endif
	@$(BIN)/python -m expertmesh.cluster.ports --nodes $(NODES) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
	  --metrics-port $(METRICS_PORT) --dashboard-port $(DASHBOARD_PORT) --prometheus-port $(PROMETHEUS_PORT)

## Serve the default CoE until Ctrl-C (gRPC :9000, HTTP :8000; dev tokens under $(EXPERTMESH_HOME)).
serve: zoo
	@$(MAKE) --no-print-directory run-ports NODES=1
	$(BIN)/expertmesh serve --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) \
	  --prometheus-port $(PROMETHEUS_PORT)

## The experts only: the monolithic baselines are benchmarks, built by the accuracy figure (make figures FIGURES=accuracy)
## or `expertmesh zoo build --baselines all`, so `make run` trains what it serves.
zoo: setup
	$(BIN)/expertmesh zoo build --baselines none

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
	  --http-host 0.0.0.0 --placement-controller --out helm/expertmesh/files/serve-config.yaml
	$(BIN)/expertmesh dashboard --out helm/expertmesh/dashboards/expertmesh-dashboard.json

## The README walk-through "Serve your own inspection data": a factory's labeled images written to disk (PNG and JPEG,
## some greyscale, an imbalanced class), a CoE spec trained from them, then spec check, zoo build, zoo report, zoo
## calibrate, and serve with a station sending each of the line's new images once, all with the real CLI (a few minutes);
## every command and its output go to docs/own-data-walkthrough.txt. OWN_DATA_DIR (its zoo and home) is made afresh.
OWN_DATA_DIR ?= /tmp/expertmesh-own-data
.PHONY: own-data-demo
own-data-demo: setup
	rm -rf $(OWN_DATA_DIR)
	$(BIN)/python bench/own_data_demo.py run $(OWN_DATA_DIR)

## The same walk-through on real images nobody here generated: the ELPV solar cells the elpv-dataset package ships
## (2,624 electroluminescence images; CC BY-NC-SA, used for measuring only), exported as a factory's folders, then
## spec check, zoo build and zoo report; every command and its output go to docs/real-data-walkthrough.txt.
## `real-data-levers` trains the training choices compared in bench/results/real_data.md (about 25 minutes here);
## `make real-data-levers VARIANTS=a,b` re-runs just those, keeping the file's other rows (--merge).
REAL_DATA_DIR ?= /tmp/expertmesh-real-data
.PHONY: real-data-demo real-data-levers
real-data-demo: setup
	rm -rf $(REAL_DATA_DIR)
	$(BIN)/python bench/real_data_demo.py run $(REAL_DATA_DIR)
real-data-levers: setup
	rm -rf $(REAL_DATA_DIR)-levers
	$(BIN)/python -m expertmesh.bench.real_data_levers $(REAL_DATA_DIR)-levers --out bench/results/real_data \
	  $(if $(VARIANTS),--variants $(VARIANTS) --merge)

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
## Ray), throughput (expertmesh bench throughput, starts Ray), make_run node_loss (start Ray and serve), ci (a clean clone's `bash .ci/run`, ~15 min), training
## (`make run`'s training into a fresh zoo, ~14 min).
## `.venv/bin/python bench/figures.py render` only re-renders the README from the committed files.
FIGURES ?= all
.PHONY: figures
figures: zoo
	$(BIN)/python bench/figures.py refresh $(FIGURES)
