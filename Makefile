# Entry points for people and CI. Everything runs from .venv, built by scripts/setup-venv.sh.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint bench-selection tiny-model clean

venv:
	bash scripts/setup-venv.sh

## The test command (README, CI): builds the environment, then runs lint and every test.
test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

bench-selection: venv
	$(PY) benchmarks/selection.py

tiny-model: venv
	$(VENV)/bin/idselect tiny-model models/tiny-llava

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache .hypothesis
