# edgesplit developer entry points. Every target sets up its own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

PROTO_SRC := $(wildcard protos/edgesplit/v1/*.proto)
PROTO_OUT := runtime/proto

.PHONY: install demo test lint proto proto-check bench bench-quick bench-loopback bench-planner bench-fleet clean

# torch: the CPU build (~200 MB wheel) unless this machine has an NVIDIA GPU; PyPI's default torch for
# Linux x86-64 is the CUDA build with multi-GB dependencies. The one override, TORCH_INDEX:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build
#   TORCH_INDEX= make install    # no extra index: PyPI and pip's own config only (offline mirrors, CI here)
# On arm64 (Raspberry Pi OS, Jetson without CUDA) PyPI's torch is already the CPU build.
# Where the CPU index cannot be reached (an offline mirror, a machine with the wheel on disk), pip's
# own configuration is used instead of retrying it for a minute.
CPU_INDEX    := https://download.pytorch.org/whl/cpu
CPU_INDEX_UP ?= $(shell $(PYTHON) -c "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null && echo up)
TORCH_INDEX  ?= $(if $(shell command -v nvidia-smi),,$(if $(CPU_INDEX_UP),$(CPU_INDEX)))
TORCH_PIP   := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

# The constraints file pins torch 2.13.0 (the tested version; pyproject allows 2.13.x).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(TORCH_PIP) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgesplit demo

# One pytest process per test module, so a hang or crash in one module cannot take the rest of
# the run with it and each module's time shows. (What prompted it was a hang: the planner's
# drain waited forever on a cancelled re-plan task, a Python 3.11 wait_for race, now fixed and
# covered by test_close_returns_while_registrations_keep_waking_the_planner.)
test: $(STAMP) proto-check
	@failed=""; start=$$(date +%s); \
	for f in tests/test_*.py; do \
	    echo "== $$f"; $(PY) -m pytest -q -p no:cacheprovider $$f || failed="$$failed $$f"; \
	done; \
	echo "== all test modules ran in $$(( $$(date +%s) - start )) s"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi

# ruff (rules in pyproject.toml), mypy (strict on runtime.contracts, runtime.wire and the modules its overrides list) and the
# import contracts (import-linter: the runtime never imports the planner; layers flow one way).
lint: $(STAMP)
	$(VENV)/bin/ruff check runtime planner tests
	$(VENV)/bin/mypy runtime/contracts runtime/wire runtime/models planner/measured.py planner/compute.py runtime/agent/telemetry.py runtime/agent/telemetry_report.py \
		planner/decide.py planner/replanner.py planner/parallel_push.py planner/config.py runtime/daemon \
		planner/dpfp.py planner/dpfp_factors.py planner/parallel_plan.py planner/store_bench.py \
		runtime/parallel runtime/agent/parallel.py runtime/agent/parallel_calibrate.py runtime/agent/parallel_halo.py \
		runtime/agent/parallel_maps.py runtime/agent/parallel_push.py runtime/agent/parallel_recover.py runtime/agent/parallel_run.py \
		runtime/worker/tiles.py runtime/worker/tile_store.py runtime/cli/plan_parallel.py \
		runtime/tools/dpfp_bench.py runtime/tools/dpfp_measure.py runtime/tools/dpfp_period.py runtime/tools/dpfp_report.py runtime/tools/dpfp_round.py runtime/tools/dpfp_tilecal.py runtime/tools/dpfp_tiles.py runtime/tools/dpfp_timeline.py runtime/tools/cpuquota.py \
		runtime/tools/netem.py runtime/tools/netem_bench.py runtime/tools/pki.py runtime/tools/abuse_check.py runtime/tools/abuse_streams.py runtime/tools/abuse_tls.py runtime/tools/tls_bench.py runtime/tools/trace_bench.py runtime/tools/adapt_run.py runtime/tools/adapt_stages.py \
	runtime/tools/train_digits.py runtime/tools/tl runtime/measure/bench.py runtime/measure/profiler.py runtime/measure/defaults.py runtime/measure/demo.py runtime/measure/keepalive_cost.py runtime/measure/fleet \
		runtime/cli/agent.py runtime/cli/bench.py runtime/cli/bench_planner_fleet.py runtime/cli/certs.py runtime/cli/common.py runtime/cli/demo.py runtime/cli/health_check.py runtime/cli/import_peers.py runtime/cli/logs.py runtime/cli/main.py runtime/cli/models.py runtime/cli/plan.py runtime/cli/planner.py runtime/cli/print_config.py runtime/cli/profile.py runtime/cli/submit.py runtime/cli/tl.py runtime/cli/validate.py runtime/cli/worker.py \
		runtime/cli/bench_scenarios.py runtime/measure/scenarios/calibrate.py runtime/measure/scenarios/device.py runtime/measure/scenarios/report.py runtime/measure/scenarios/spec.py runtime/measure/scenarios/run.py runtime/measure/scenarios/testbed.py runtime/measure/scenarios/trial.py \
		planner/grid.py planner/ranking.py planner/tables.py planner/cache.py planner/evaluate.py planner/peers.py planner/fallbacks.py planner/wirebytes.py planner/rowbound.py planner/state.py planner/requests.py planner/hysteresis.py planner/search.py planner/probes.py planner/gcfreeze.py planner/metrics.py planner/broadcaster.py \
		planner/service.py planner/servicer.py planner/owners.py planner/intake.py planner/replicas.py planner/server.py planner/store.py planner/store_profiles.py planner/store_sql.py planner/store_batch.py planner/store_leases.py planner/writebehind.py planner/rankcache.py planner/refresh.py planner/inband.py planner/bench.py planner/workload.py planner/plot.py planner/streams.py
	$(VENV)/bin/lint-imports

# The headline benchmark (runtime/measure/scenarios; needs root and cgroup v1 cpu): every strategy on
# emulated IIoT links, the board under a CPU quota; results in runtime/measure/results/.
bench: $(STAMP)
	$(VENV)/bin/edgesplit bench-scenarios $(BENCH_FLAGS)

# Its quick mode (< 3 minutes; what tests/test_bench_scenarios.py runs).
bench-quick: $(STAMP)
	$(VENV)/bin/edgesplit bench-scenarios --quick --out /tmp/edgesplit-bench-quick

# One split per codec on loopback, stage by stage (the README's "Measured figures").
bench-loopback: $(STAMP)
	$(VENV)/bin/edgesplit bench

# Planner decision time against model size (recorded in planner/results/decision_time.md)
bench-planner: $(STAMP)
	$(PY) -m planner.bench

# One planner process under simulated agents over real gRPC (runtime/measure/fleet; results in
# runtime/measure/results/fleet.md): FLEET_FLAGS='--agents 10000', or '--quick'.
bench-fleet: $(STAMP)
	$(VENV)/bin/edgesplit bench-planner-fleet $(FLEET_FLAGS)

# Regenerate the checked-in gRPC/protobuf modules (pinned grpcio-tools, see constraints.txt).
proto: $(STAMP)
	rm -rf $(PROTO_OUT)/edgesplit
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
	    --grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	# protoc writes absolute imports of the proto package; make them imports of ours.
	sed -i -E 's/^from edgesplit\.v1 import/from runtime.proto.edgesplit.v1 import/' $(PROTO_OUT)/edgesplit/v1/*.py $(PROTO_OUT)/edgesplit/v1/*.pyi
	touch $(PROTO_OUT)/edgesplit/__init__.py $(PROTO_OUT)/edgesplit/v1/__init__.py

# Fails when the checked-in generated code differs from what the .proto files give.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && cp -r $(PROTO_OUT) $$tmp/before && $(MAKE) -s proto >/dev/null && \
	  if diff -r $$tmp/before $(PROTO_OUT) >/dev/null; then echo "generated protobuf code is up to date"; rm -rf $$tmp; \
	  else echo "generated protobuf code is stale: run 'make proto' and commit" >&2; diff -r $$tmp/before $(PROTO_OUT) | head -20 >&2; rm -rf $$tmp; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache
