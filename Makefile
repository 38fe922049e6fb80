# Two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test soak bench bench-quick bench-peers demo lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the server on its embedded LMDB store (data in ./data), 127.0.0.1:7433.
run: $(STAMP)
	$(PY) -m engine serve --data-dir ./data

## Embed the engine, ingest synthetic traffic, print a usage table.
demo: $(STAMP)
	$(PY) -m engine demo --data-dir ./data-demo

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

## The engine beside Redis, PostgreSQL, DuckDB and SQLite on one workload, every answer
## checked equal; installs and starts the servers itself (apt-get as root). A few minutes;
## `make bench-peers ARGS=--quick` for about a minute.
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/peers.py $(ARGS)

## Type check (mypy --strict) and lint (ruff).
lint: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lint]'
	$(PY) -m mypy engine
	$(PY) -m ruff check engine tests benchmarks

clean:
	rm -rf $(VENV) data data-demo .pytest_cache .hypothesis
