# Two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test soak bench bench-quick bench-growth bench-peers demo lint clean browser screenshots

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the server on its embedded LMDB store (data in ./data): TCP on 127.0.0.1:7433,
## HTTP on 127.0.0.1:7434 (docs/http.md).
run: $(STAMP)
	$(PY) -m engine serve --data-dir ./data --http-port 7434

## Embed the engine, ingest synthetic traffic, print a usage table.
demo: $(STAMP)
	$(PY) -m engine demo --data-dir ./data-demo

## The whole fast suite (slow soaks are excluded; see `make soak`).
test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow"

## Debian's Chromium for the explorer's browser tests (Playwright drives /usr/bin/chromium;
## it never downloads a browser of its own). Installed only when missing; without root the
## browser tests skip and say why, except under CI=true, where they fail.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "/usr/bin/chromium is missing and this is not root: the explorer's browser tests will skip"; \
	  fi; \
	fi

## The explorer's screenshots in docs/explorer/ (README.md and docs/explorer.md show them),
## taken by Chromium from a live server with known events.
screenshots: $(STAMP) browser
	$(PY) -m tests.explorer_screenshots docs/explorer

## Long, bounded soak and stress tests.
soak: $(STAMP)
	$(PY) -m pytest -q -m slow

# The benchmarks also need the bench extra (matplotlib for the plots, peer clients).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench,test]'
	touch $(BENCH_STAMP)

## The whole benchmark suite (~15 min on 2 cores): rewrites the generated section of
## docs/benchmarks.md and docs/bench/*.png. Extra options: make bench BENCH_ARGS='--no-peers'
## (history growth over simulated days is separate: make bench-growth).
bench: $(BENCH_STAMP)
	$(PY) benchmarks/suite.py --write-docs $(BENCH_ARGS)

## A small suite (~1 min); writes /tmp/metering-bench-quick/, never docs/.
bench-quick: $(BENCH_STAMP)
	$(PY) benchmarks/suite.py --quick $(BENCH_ARGS)

## History growth over simulated days (benchmarks/growth.py): memory, snapshot stalls, restart
## after SIGKILL and query times per checkpoint day. Quick by default (~1 min); the full
## 64-day shape: make bench-growth GROWTH_ARGS='--days 64' (hours, 2 x 8-11 GiB today).
GROWTH_ARGS ?= --quick
bench-growth: $(BENCH_STAMP)
	$(PY) benchmarks/growth.py $(GROWTH_ARGS)

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
