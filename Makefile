# Two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test soak bench bench-quick demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the engine with its embedded LMDB store (data in ./data) and run the demo workload.
run: $(STAMP)
	$(PY) -m engine demo --data-dir ./data

## The whole fast suite (slow soaks are excluded; see `make soak`).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## Long, bounded soak and stress tests.
soak: $(STAMP)
	$(PY) -m pytest -q -m slow

## In-process ingest benchmark; results are appended to the terminal as a table and JSON.
bench: $(STAMP)
	$(PY) benchmarks/ingest.py

bench-quick: $(STAMP)
	$(PY) benchmarks/ingest.py --quick

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
