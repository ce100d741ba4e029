# Two commands for a newcomer: `make run` serves the service, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FHIR_VENV := .fhir-venv
SEKMET_VERSION := 0.1.1
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run install dev fhir-server-env postgres-bin test lint check bench harness image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The project itself (runtime dependencies only).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The project plus its test tools.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

run: install
	$(BIN)/cds-service serve --host $(HOST) --port $(PORT)

# The real FHIR R4 server the integration tests start (its own venv: it pins its own pydantic).
$(FHIR_VENV)/.installed:
	$(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/pip install --quiet sekmet-fhir==$(SEKMET_VERSION)
	touch $@

fhir-server-env: $(FHIR_VENV)/.installed

# PostgreSQL server binaries (Debian package) for the store tests; the tests start and stop it.
postgres-bin:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing PostgreSQL server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "WARNING: could not install PostgreSQL; its tests will be skipped"; \
	fi

test: dev fhir-server-env postgres-bin
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check .

check: install
	$(BIN)/cds-service check

bench: dev fhir-server-env
	$(BIN)/python -m cds_service.tools.bench --out bench-results

# Check a deployment end to end: make harness SERVICE=https://cds.example.org FHIR=https://fhir.example.org/r4
SERVICE ?= http://127.0.0.1:8080
FHIR ?= http://127.0.0.1:8090/fhir
harness: install
	$(BIN)/cds-service harness --service $(SERVICE) --fhir $(FHIR) --mode both --junit harness-junit.xml

# Needs a Docker engine (not available in CI): see docs/deploy.md.
image:
	docker build -f docker/Dockerfile -t cds-septic-shock-trials .

clean:
	rm -rf $(VENV) $(FHIR_VENV) .pytest_cache .ruff_cache .hypothesis
