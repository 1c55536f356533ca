# Entry points for people and CI. Everything runs from .venv, built by scripts/setup-venv.sh.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv system test test-fast test-releases lint demo bench-selection tiny-model shapes-model accuracy clean

venv:
	bash scripts/setup-venv.sh

# Debian packages some tests need (Prometheus, docker-compose); installs only what is missing.
system:
	bash scripts/setup-system.sh

# Tests run in TEST_WORKERS processes (pytest-xdist; --dist loadfile keeps a module in one process,
# so its module fixtures, servers included, start once; modules start in tests/conftest.py's order,
# not xdist's most-tests-first). Each process has its own cores (tests/conftest.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## The test command (README, CI): builds the environment, then runs lint and every test.
test: venv system
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) --durations=30

## The inner loop (under 5 minutes on 2 cores): lint, the tests that start no vLLM engine and no
## release lane, then one real server (tests/test_server.py). `make test` before you push.
test-fast: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) -m "not engine and not releases and not slow"
	$(PY) -m pytest tests/test_server.py

## The vLLM release lane alone (also part of `make test`): the gpu extra resolves beside vLLM
## 0.32/0.33/0.34, and the plugin behaves the same on 0.33/0.34's Python layer (docs/vllm-releases.md).
test-releases: venv
	$(PY) -m pytest -m releases

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
	rm -rf $(VENV) models .cache .pytest_cache .ruff_cache .hypothesis

## The accuracy test bed (docs/testbed.md): a LLaVA-1.5-architecture model trained here (about 110 minutes on 2 cores).
## SHAPES_ARGS changes its schedule (`--lm-steps N`, ...): give `make accuracy` the same to use that model.
shapes-model: venv
	$(PY) -m testbed.model models/shapes-llava $(SHAPES_ARGS)

## Accuracy retention on the test bed: 1,000 held-out questions through `idselect serve`, budgets
## x selectors x question kinds, then the validity checks and targets (docs/performance.md).
ACCURACY_OUT := out/accuracy
accuracy: shapes-model
	$(PY) -m testbed.task out/shapes-eval --items 1000 --seed 1
	$(PY) -m benchmarks.accuracy --data out/shapes-eval/data.jsonl --start models/shapes-llava \
		--budgets full,192,64,32,16,8 --selectors all --max-tokens 3 --concurrency 8 \
		--out $(ACCURACY_OUT)
	$(PY) -m testbed.report $(ACCURACY_OUT)/accuracy.json \
		--data out/shapes-eval/data.jsonl --model models/shapes-llava
