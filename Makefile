# Two commands matter: `make demo` (see the whole pipeline work) and `make test`.
# Both create .venv on first use and install the pinned dependencies into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser haproxy prometheus checkov test test-fast lint demo bench fleet clean help

help:
	@echo "make demo    train a small 3G-Net on built-in data, export, serve with Triton, open the demo"
	@echo "make test    install everything and run the whole test suite (what CI runs)"
	@echo "make bench   CPU benchmarks; tables land in bench/results/"
	@echo "make fleet   two Triton replicas behind HAProxy on model_repository (after make demo)"
	@echo "make lint    ruff"

# The virtual environment, rebuilt when the pins change.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	@touch $@

setup: $(STAMP)

# Debian's Chromium for the browser tests (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Debian's HAProxy for the fleet rehearsal (deploy/local_fleet.py, tests/test_fleet.py).
haproxy:
	@command -v haproxy >/dev/null 2>&1 || { \
		echo "installing Debian's haproxy for the fleet rehearsal"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq haproxy >/dev/null; }

# Debian's Prometheus (and promtool) for the fleet rehearsal's monitoring (deploy/local_fleet.py --prometheus,
# tests/test_monitoring.py, docs/monitoring.md).
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
		echo "installing Debian's prometheus for the fleet rehearsal's monitoring"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq prometheus >/dev/null; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup browser haproxy prometheus lint checkov
	$(PY) -m pytest

# checkov, the scanner behind tests/test_least_privilege.py, in an environment of its own (its pins
# would fight requirements.lock), then its scans: 0 failed checks on the manifests and the images.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := build/checkov
$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "checkov==$(CHECKOV_VERSION)"
	@touch $@

checkov: $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes -d deploy
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework dockerfile -f serve/Dockerfile
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework dockerfile -f training/Dockerfile

# Everything but the tests marked slow: a quick check while developing.
test-fast: setup
	$(PY) -m pytest -m "not slow"

# The whole pipeline on built-in data: generate, train, export, serve, demo (Ctrl-C stops).
#   make demo RETRAIN=1                      train and export again
#   make demo CHECKPOINT=path/to/ckpt        serve that checkpoint instead of training
demo: setup
	$(PY) pipeline/run_all.py $(if $(RETRAIN),--retrain) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

# Two replicas behind HAProxy on this machine, serving model_repository (what deploy/kubernetes runs).
fleet: setup haproxy prometheus
	$(PY) deploy/local_fleet.py --model-repository model_repository --replicas 2 --prometheus

# CPU benchmarks (model speed, INT8/bf16, serving overhead, overload, realistic payloads, soak): tables in bench/results/;
# finished studies: bench/studies/README.md.
bench: setup
	$(PY) bench/run.py

clean:
	rm -rf runs artifacts bench/results tests/artifacts .pytest_cache
