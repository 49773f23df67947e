# lastguard's interface: make demo | test | bench | proto | lint
# Everything runs from a local virtualenv that `make venv` creates on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help venv demo test test-unit test-e2e bench bench-micro bench-profile soak proto proto-check lint manifests image clean

help:
	@echo "make demo   - start dev issuer, sidecar, app and Envoy; walk through requests"
	@echo "make test   - lint, type-check and run every test (unit + end-to-end with real Envoy)"
	@echo "make bench  - benchmark through Envoy vs jwt_authn and a no-op server (docs/performance.md)"
	@echo "make bench-micro / bench-profile - the Check handler in-process, with cProfile output"
	@echo "make soak   - 10 minutes at 1k req/s through Envoy: does lastguard's RSS grow? (~12 min)"
	@echo "make proto  - regenerate Python code from proto/src"
	@echo "make lint   - ruff + mypy"
	@echo "make manifests - re-render manifests/install.yaml from the chart"
	@echo "make image  - docker build (needs a Docker engine)"

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: lint proto-check
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e

bench: $(STAMP)
	$(PY) scripts/bench.py

bench-micro: $(STAMP)
	$(PY) scripts/bench_micro.py

bench-profile: $(STAMP)
	$(PY) scripts/bench_micro.py --rounds 1 --profile

soak: $(STAMP)
	$(PY) scripts/soak.py

manifests: $(STAMP)
	$(PY) scripts/render_manifests.py

image:
	docker build -t lastguard:0.1.0 .

proto: $(STAMP)
	$(PY) scripts/genproto.py

proto-check: $(STAMP)
	$(PY) scripts/genproto.py --check

# mypy reads the installed import names through a tree of links (lastguard/sidecar -> sidecar/).
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar operator tests scripts setup.py
	@mkdir -p $(TYPECHECK)/lastguard
	@ln -sfn ../../../sidecar $(TYPECHECK)/lastguard/sidecar
	@ln -sfn ../../../proto $(TYPECHECK)/lastguard/proto
	@ln -sfn ../../../operator $(TYPECHECK)/lastguard/operator
	cd $(TYPECHECK) && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p lastguard.sidecar -p lastguard.operator
	MYPYPATH=scripts:. $(VENV)/bin/mypy --config-file pyproject.toml scripts/*.py scripts/benchkit/*.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .demo .bench
