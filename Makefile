# Two entry points: `make run` (set up, then train the built-in task) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 9400
# test processes (pytest-xdist); each test file stays on one, so its module fixtures are made once
TEST_WORKERS ?= 2

.PHONY: setup run test test-quick lint docs bench kubernetes clean

$(STAMP): pyproject.toml constraints.txt examples/csv-sink/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# the example plugin package: the tests discover its entry point like any installed plugin
	$(BIN)/pip install --quiet --no-deps -e examples/csv-sink
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/traintel train --config configs/default.yaml --set sinks.prometheus.port=$(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m 'not slow' -q

lint: $(STAMP)
	$(BIN)/ruff check traintel tests benchmarks examples docker/kubernetes docs
	$(BIN)/ruff format --check traintel tests benchmarks examples docker/kubernetes docs
	$(BIN)/mypy
	$(BIN)/lint-imports

# the documentation site in site/; its reference pages are generated from the code (traintel/reference.py)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/scrapes.py
	$(BIN)/python benchmarks/slow_sink.py

# docker/kubernetes' ConfigMaps and PrometheusRule, from configs/default.yaml, the rules and the dashboard
kubernetes: $(STAMP)
	$(BIN)/python docker/kubernetes/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
