"""The usage explorer's speed, measured in the browser, at the suite's 10M-event state.

A plain script (not collected by pytest; tests/test_explorer.py runs it on a tiny
workload). It starts ``meter serve --http-port 0`` (``ServerProcess``), streams a
seeded workload in over TCP (``WorkloadStream``, the recovery benchmark's 10M-event
state by default), then drives Debian's Chromium (Playwright, ``/usr/bin/chromium``)
against the page:

- **first view**: a fresh browser context (nothing cached) loads ``/`` and the
  default view (the first meter, 7 days by day, top 10 customers plus other, the
  first 50 totals); the figure is the time from navigation start to the page's
  view being drawn, as the page itself reports it (``performance.now()``).
- **change of view**: from the default view, one control at a time (window day →
  hour, range 7 d → 30 d, another meter, the table's next page, group by a
  dimension key); the figure is the time from the change to the new view drawn.

Every view runs the same queries a user's would, over HTTP. The goals (issue 13)
are under 1 s for the first view and under 200 ms for a change of view.

    python benchmarks/explorer.py --quick          # 200k events, a minute
    python benchmarks/explorer.py                  # 10M events (ingest takes minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkFailure, machine_facts, percentile
from benchmarks.http_ingest import _http_port
from benchmarks.query_latency import current_minute_ms
from benchmarks.recovery import stream_ingest
from benchmarks.serve import ServerProcess
from benchmarks.workload import AGGREGATIONS_MIXED, WorkloadStream

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FIRST_VIEW_GOAL_MS = 1000.0
CHANGE_GOAL_MS = 200.0
DONE = ("n => +(document.documentElement.dataset.renders || 0) > n"
        " && document.documentElement.dataset.busy === '0'")


def _renders(page: Any) -> int:
    return int(page.evaluate("+(document.documentElement.dataset.renders || 0)"))


API_SINCE = """t0 => performance.getEntriesByType('resource')
    .filter(e => e.startTime >= t0 && new URL(e.name).pathname.startsWith('/api/')
                 && !new URL(e.name).pathname.includes('stream'))
    .map(e => e.duration)"""


def _timed_change(page: Any, action: Callable[[], object],
                  timeout_ms: float) -> tuple[float, list[float]]:
    """The view's time from the change to drawn, and the API requests it made (ms each)."""
    before = _renders(page)
    started = page.evaluate("performance.now()")
    action()
    page.wait_for_function(DONE, arg=before, timeout=timeout_ms)
    state = page.evaluate("document.getElementById('chart').dataset.state")
    if state not in ("ready", "empty"):
        raise BenchmarkFailure(f"the view ended {state!r}: {page.inner_text('#status')}")
    return (float(page.evaluate("document.documentElement.dataset.renderMs")),
            page.evaluate(API_SINCE, started))


Timing = tuple[float, list[float]]  # the view's ms, and each API request's ms


def _visit(browser: Any, base: str, timeout_ms: float) -> tuple[Timing, dict[str, Timing]]:
    """One fresh visit: the first view's time, then each change of view's."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(base + "/")
    page.wait_for_function(DONE, arg=0, timeout=timeout_ms)
    first = (float(page.evaluate("document.documentElement.dataset.firstViewMs")),
             page.evaluate(API_SINCE, 0))
    meters = page.eval_on_selector_all("#meter option", "os => os.map(o => o.value)")
    group_keys = page.eval_on_selector_all("input[data-group-key]", "es => es.map(e => e.value)")
    steps: list[tuple[str, Callable[[], object]]] = [
        ("window_day_to_hour", lambda: page.select_option("#window", "hour")),
        ("window_hour_to_day", lambda: page.select_option("#window", "day")),
        ("range_7d_to_30d", lambda: page.select_option("#range", "30d")),
        ("range_30d_to_7d", lambda: page.select_option("#range", "7d")),
    ]
    if page.is_enabled("#page-next"):  # more than one page of customers
        steps.append(("table_next_page", lambda: page.click("#page-next")))
    dimension = next((k for k in group_keys if k != "customer_id"), None)
    if dimension is not None:
        steps.append(("group_by_dimension",
                      lambda: page.check(f"input[data-group-key='{dimension}']")))
    if len(meters) > 1:
        steps.append(("another_meter", lambda: page.select_option("#meter", meters[1])))
    changes = {name: _timed_change(page, action, timeout_ms) for name, action in steps}
    context.close()
    return first, changes


def measure_browser(http_port: int, *, repeats: int, timeout_s: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{http_port}"
    first: list[Timing] = []
    changes: dict[str, list[Timing]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for _ in range(repeats):
            first_view, visit = _visit(browser, base, timeout_s * 1000)
            first.append(first_view)
            for name, timing in visit.items():
                changes.setdefault(name, []).append(timing)
        browser.close()

    def summary(timings: list[Timing], goal_ms: float) -> dict[str, Any]:
        ordered = sorted(ms for ms, _ in timings)
        slowest = [max(requests, default=0.0) for _, requests in timings]
        return {"samples": len(ordered), "p50_ms": statistics.median(ordered),
                "p90_ms": percentile(ordered, 0.9), "max_ms": ordered[-1], "goal_ms": goal_ms,
                "meets_goal": statistics.median(ordered) < goal_ms,
                "api_requests": statistics.median(len(requests) for _, requests in timings),
                "slowest_api_p50_ms": statistics.median(slowest)}

    return {"first_view": summary(first, FIRST_VIEW_GOAL_MS),
            "changes": {name: summary(samples, CHANGE_GOAL_MS)
                        for name, samples in changes.items()}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k events, 3 repeats")
    parser.add_argument("--events", type=int, default=None, help="default 10M (quick 200k)")
    parser.add_argument("--customers", type=int, default=None,
                        help="customer universe (Zipf), default 100k (quick 10k)")
    parser.add_argument("--meters", type=int, default=5)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick 3)")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 200_000 if args.quick else 10_000_000
    if args.customers is None:
        args.customers = 10_000 if args.quick else 100_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    stream = WorkloadStream(args.seed, customers=args.customers, meters=args.meters,
                            events=args.events, now_ms=current_minute_ms(),
                            aggregations=AGGREGATIONS_MIXED)
    with tempfile.TemporaryDirectory(prefix="meter-bench-explorer-") as data_dir:
        server = ServerProcess(args.shards, data_dir=data_dir, flags=("--http-port", "0"),
                               start_timeout_s=600.0)
        try:
            ingest = trio.run(stream_ingest, server.port, stream, args.in_flight,
                              args.timeout_s)
            ingest.pop("stats")
            browser = measure_browser(_http_port(server), repeats=args.repeats,
                                      timeout_s=min(args.timeout_s, 120.0))
        finally:
            server.stop(kill=True)
    report = {"benchmark": "explorer", "machine": machine_facts(),
              "parameters": {"events": args.events, "customers": args.customers,
                             "meters": args.meters, "shards": args.shards,
                             "repeats": args.repeats, "seed": args.seed},
              "ingest": ingest, "browser": browser}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = ["| view | samples | p50 ms | p90 ms | max ms | API requests | slowest request ms "
             "| goal |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    rows = [("first view", report["browser"]["first_view"]),
            *report["browser"]["changes"].items()]
    for name, r in rows:
        verdict = "met" if r["meets_goal"] else "**missed**"
        lines.append(f"| {name} | {r['samples']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} "
                     f"| {r['max_ms']:.0f} | {r['api_requests']:.0f} "
                     f"| {r['slowest_api_p50_ms']:.0f} | < {r['goal_ms']:.0f} ms: {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["machine"]))
    print(f"{args.events:,} events ingested at {report['ingest']['events_per_s']:,.0f} events/s")
    print(format_table(report))
    print(json.dumps(report["browser"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
