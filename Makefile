# Two commands on a fresh machine: `make serve` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

SHARED ?= $(abspath ../shared)

.PHONY: setup proto serve test lint unit redis-server chromium container-setup bench clean image

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no dependency can pull a multi-GB CUDA build on a CPU machine
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,kernels]'
	touch $@

proto: setup
	$(PY) tools/gen_proto.py

redis-server:
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)

chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# podman for the container tests (no Docker engine on these machines); skipped where docker answers
CONTAINER_SETUP := $(firstword $(wildcard $(SHARED)/tools/container-setup /work/shared/tools/container-setup))
container-setup:
	@docker info >/dev/null 2>&1 || { test -n "$(CONTAINER_SETUP)" && $(CONTAINER_SETUP) >/dev/null; } \
	  || echo "warning: no docker engine and no container-setup script found: container tests cannot run"

image: container-setup
	podman build --format docker --network host -v /etc/ssl/certs:/etc/ssl/certs:ro -v /opt/wheels:/opt/wheels:ro \
	  --build-arg PIP_FIND_LINKS=/opt/wheels --build-arg TORCH_INDEX_URL= --build-arg BASE_IMAGE=localhost/pybase:3.11 \
	  --target cpu -t worldserve:cpu .

serve: proto
	$(VENV)/bin/worldserve serve --model-repo models

lint: setup
	$(VENV)/bin/ruff check .

test: proto redis-server chromium container-setup lint
	$(PY) -m pytest

unit: proto
	$(PY) -m pytest tests/unit

bench: proto
	$(PY) -m bench.load --quick

clean:
	rm -rf $(VENV) service/api/gen/*_pb2*.py* artifacts .pytest_cache
