# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export AVP_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(AVP_DATA_DIR)/dagster_home
# Geneva's per-fragment progress bars would flood the Dagster logs; assets log their own progress.
export TQDM_DISABLE ?= 1
DEMO_FRAMES ?= 1000
# Footage clips (BDD100K MOT layout) in the same batch: each lands whole in train or val.
DEMO_CLIPS ?= 4
DEMO_CLIP_FRAMES ?= 15
HOST ?= 127.0.0.1
PORT ?= 3000
# The shared Ray head (`make ray`): its GCS port, the CPUs it gives jobs (empty: all) and the port
# of the Ray Client server Ray starts beside it (runs attach as drivers and never use it).
RAY_PORT ?= 6379
RAY_CPUS ?=
RAY_CLIENT_PORT ?= 10001

.PHONY: install browser demo base test test-fast dev instance clean ray ray-stop

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

instance:
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"

# The main job: synthetic footage (detection frames and clips) if the landing zone is empty, then every asset.
demo: install instance
	$(BIN)/python -m avperception_assets.synthetic --batch-id demo-0001 --frames $(DEMO_FRAMES) \
	  --clips $(DEMO_CLIPS) --frames-per-clip $(DEMO_CLIP_FRAMES) --if-empty
	$(BIN)/dagster asset materialize -m avperception_assets.definitions --select '*'
	$(BIN)/python -m avperception_assets.summary

# The long base detector (profile cpu_long: 40 epochs, about 40 minutes here) on the demo's
# footage, cached in $(AVP_DATA_DIR)/checkpoints/base_long/: base_detector reuses it from then on
# (make demo, the benchmarks) instead of training its short base.
base: install instance
	$(BIN)/python -m avperception_assets.synthetic --batch-id demo-0001 --frames $(DEMO_FRAMES) \
	  --clips $(DEMO_CLIPS) --frames-per-clip $(DEMO_CLIP_FRAMES) --if-empty
	$(BIN)/dagster asset materialize -m avperception_assets.definitions --select raw_frames,base_detector \
	  --config-json '{"ops": {"base_detector": {"config": {"profile": "cpu_long"}}}}'

# The web UI test drives Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/python -m pytest -q -n 2 --durations=25 avperception_assets_tests

# What a change to one stage runs first, in under a minute: no Ray, no Dagster run, no training,
# no browser (pyproject's markers; conftest fails a test that does one of them unmarked).
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not (ray or dagster_run or training or browser or fresh_interpreter)" avperception_assets_tests

# The web UI and the daemon (sensors, run queue) on http://$(HOST):$(PORT).
dev: install instance
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

# A long-lived local Ray head that runs attach to instead of starting their own: set
# AVP_RAY_ADDRESS=127.0.0.1:$(RAY_PORT) where runs start (the command prints it).
ray: install
	$(BIN)/python -m avperception_assets.ray_head start --port $(RAY_PORT) --client-port $(RAY_CLIENT_PORT) \
	  $(if $(RAY_CPUS),--num-cpus $(RAY_CPUS))

ray-stop:
	$(BIN)/python -m avperception_assets.ray_head stop --port $(RAY_PORT)

# A data location in a bucket (s3://bucket/prefix): its project prefixes and its local cache.
clean: $(if $(findstring ://,$(AVP_DATA_DIR)),install)
ifneq (,$(findstring ://,$(AVP_DATA_DIR)))
	$(BIN)/python -m avperception_assets.clean
else
	rm -rf "$(AVP_DATA_DIR)/landing" "$(AVP_DATA_DIR)/lancedb" "$(AVP_DATA_DIR)/checkpoints" \
	       "$(AVP_DATA_DIR)/reports"
endif
	rm -rf "$(AVP_DATA_DIR)/dagster_home"
