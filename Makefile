# `make run` serves the API (add ARGS="--random-weights" offline); `make test` runs every test,
# `make test-quick` all but the slow integration suites (marker `slow`, see pytest.ini).
# Each creates the virtualenv on first use. `make bench` prints the performance table.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test test-quick bench examples clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Latency, memory, startup and concurrency table (~10 min on 2 cores); see bench/RESULTS.md.
bench: $(VENV)/.installed
	$(PY) -m bench.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
