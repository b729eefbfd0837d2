# `make demo` runs the demo, `make test` runs the test suite; both set up a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup test-setup test demo demo-fleet lint bench

$(BIN)/.installed: setup.cfg pyproject.toml setup.py ml_wsgi_metrics/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's packages: the real Prometheus server and promtool; Chromium for the HTML page test.
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

/usr/bin/promtool:
	$(SUDO) apt-get update -qq
	$(APT_INSTALL) prometheus

# Alertmanager and amtool, for the fleet's alert delivery (tests/test_fleet.py, make demo-fleet).
/usr/bin/prometheus-alertmanager:
	$(SUDO) apt-get update -qq
	$(APT_INSTALL) prometheus-alertmanager

/usr/bin/chromium:
	$(SUDO) apt-get update -qq
	$(APT_INSTALL) chromium

# For the benchmarks: wrk loads gunicorn, valgrind counts instructions.
/usr/bin/wrk /usr/bin/valgrind:
	$(SUDO) apt-get update -qq
	$(APT_INSTALL) $(notdir $@)

setup: $(BIN)/.installed /usr/bin/promtool

test-setup: setup /usr/bin/chromium /usr/bin/prometheus-alertmanager

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy  # --strict on ml_wsgi_metrics/ (pyproject.toml): py.typed promises types

test: test-setup lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m service.demo

demo-fleet: setup /usr/bin/prometheus-alertmanager
	$(BIN)/python -m service.fleet_demo

bench: setup /usr/bin/wrk /usr/bin/valgrind
	for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done
