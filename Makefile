# Entry points for people and CI. Everything runs from .venv, built by scripts/setup-venv.sh.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv system test lint demo bench-selection tiny-model clean

venv:
	bash scripts/setup-venv.sh

# Debian packages some tests need (Prometheus, docker-compose); installs only what is missing.
system:
	bash scripts/setup-system.sh

## The test command (README, CI): builds the environment, then runs lint and every test.
test: venv system
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

## The main job: tiny model + server on 127.0.0.1:8000, one request at full budget, one at 16.
demo: venv
	$(PY) -m devtools.demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench-selection: venv
	$(PY) -m benchmarks.selection

tiny-model: venv
	$(VENV)/bin/idselect tiny-model models/tiny-llava

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache .hypothesis
