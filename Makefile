# `make run` serves the API (add ARGS="--random-weights" offline); `make test` runs every test,
# the Ray Serve cluster's included (it installs requirements-cluster.txt and needs redis-server);
# `make test-quick` all but the slow integration suites (marker `slow`, see pytest.ini).
# `make cluster ARGS="--model gpt2 --replicas 2"` serves the API from replicas on a local Ray.
# Each creates the virtualenv on first use. `make bench` prints the performance table.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run cluster test test-quick bench examples clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# The optional cluster install (Ray Serve, redis-py): only `make test` and `make cluster` need it.
$(VENV)/.cluster-installed: $(VENV)/.installed requirements-cluster.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-cluster.txt  # one resolve: the pins hold
	touch $@

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

cluster: $(VENV)/.cluster-installed
	$(PY) -m explorer.cluster $(ARGS)

test: $(VENV)/.cluster-installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Latency, memory, startup and concurrency table (~10 min on 2 cores); see bench/RESULTS.md.
bench: $(VENV)/.installed
	$(PY) -m bench.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
