# Two commands on a fresh machine: `make serve` and `make test`. Each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup proto serve test lint unit redis-server bench clean

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

serve: proto
	$(VENV)/bin/worldserve serve

lint: setup
	$(VENV)/bin/ruff check .

test: proto redis-server lint
	$(PY) -m pytest

unit: proto
	$(PY) -m pytest tests/unit

bench: proto
	$(PY) -m bench.load --quick

clean:
	rm -rf $(VENV) service/api/gen/*_pb2*.py* artifacts .pytest_cache
