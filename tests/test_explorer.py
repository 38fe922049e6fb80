"""The usage explorer in a real browser: Playwright driving Debian's Chromium against a live
server with known events; what the page plots and tabulates is compared with the engine's
own query answers.

The server (an engine on the in-memory store and the HTTP shell on 127.0.0.1, port 0) runs
in its own thread under ``trio.run``, so the tests are plain synchronous Playwright code;
``LiveServer.run`` calls into the engine on the server's event loop. The browser's clock is
fixed at ``NOW`` in Europe/Berlin, the engine's too, so "the last 7 days" is the same days
for both. The tests wait on page state (``html[data-renders]``, selectors), never on time.

Without ``/usr/bin/chromium`` (or Playwright) the tests skip with the reason, except under
``CI=true``, where a missing browser fails the run (``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
import requests
import trio

from engine import Engine, Event, Limit, Meter, Query, QueryResult, Take, open_engine
from engine.auth import KeyRing, parse_keys
from engine.http import HttpConfig, HttpServer
from engine.storage.memory import MemoryStore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NOW = 1_790_000_000_000  # 2026-09-21 16:13:20 in Berlin: the engine's and the browser's clock
ZONE = "Europe/Berlin"
DAY = 86_400_000
HOUR = 3_600_000
CUSTOMERS = [f"cust-{i:02d}" for i in range(55)]  # more than one table page of 50
KEYS = {"keys": [{"key": "reader-key", "scopes": ["query"]},
                 {"key": "acme-key", "scopes": ["query"], "customer_id": "acme"}]}

T = TypeVar("T")


def _berlin_midnight(days_before_today: int) -> int:
    today = datetime.fromtimestamp(NOW / 1000, ZoneInfo(ZONE)).date()
    day = today - timedelta(days=days_before_today)
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(ZONE)).timestamp()) * 1000


SEVEN_DAYS = (_berlin_midnight(6), _berlin_midnight(-1))  # the default view's range


def known_events() -> list[Event]:
    """Customer cust-NN gets 55 - NN units a day over the last 8 days (so every total is
    distinct), in region eu or us; acme has an exact decimal that no float can hold."""
    events = []
    for index, customer in enumerate(CUSTOMERS):
        for day in range(8):
            at = _berlin_midnight(day) + (index % 20) * HOUR + 60_000
            if at >= NOW:
                at = NOW - 1000 * (index + 1)
            events.append(Event(meter_api_name="api_calls", customer_id=customer,
                                meter_value=len(CUSTOMERS) - index, meter_time_in_millis=at,
                                dimensions={"region": "eu" if index % 3 else "us"}))
            if index < 12:
                events.append(Event(meter_api_name="storage_gb", customer_id=customer,
                                    meter_value=Decimal(100 + index * 7 + day) / 10,
                                    meter_time_in_millis=at, dimensions={"tier": "hot"}))
    events.append(Event(meter_api_name="api_calls", customer_id="acme",
                        meter_value=Decimal("100000000000000000000.1"),
                        meter_time_in_millis=NOW - 2 * HOUR, dimensions={"region": "eu"}))
    return events


KNOWN_LIMITS = [Limit(id="acme-daily", meter_api_name="api_calls", customer_id="acme",
                      thresholds=[10, 10**21], period="day", timezone=ZONE)]


class LiveServer:
    """An engine and its HTTP shell on 127.0.0.1 in a thread of their own (one trio loop)."""

    def __init__(self, events: Callable[[], list[Event]] | None = None,
                 limits: list[Limit] | None = None) -> None:
        self.events = events or known_events
        self.limits = limits if limits is not None else KNOWN_LIMITS
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.engine: Engine | None = None
        self.servers: dict[str, HttpServer] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="explorer-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        if not self.ready.wait(30) or self.failure is not None:
            raise RuntimeError("the live server did not start") from self.failure
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None and self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    def url(self, path: str = "/", which: str = "open") -> str:
        return f"http://127.0.0.1:{self.servers[which].port}{path}"

    def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` on the server's loop, from a test."""
        return trio.from_thread.run(function, *args, trio_token=self._token)

    def query(self, **fields: Any) -> QueryResult:
        assert self.engine is not None
        return self.run(self.engine.query, Query(**fields))

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread by __enter__
            self.failure = exc
            self.ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW,
                               tune_gc=False) as engine:
            self.engine = engine
            for meter in (Meter(name="storage_gb", aggregation="max"),
                          Meter(name="api_calls", aggregation="sum"),
                          Meter(name="zeta_unused", aggregation="sum")):
                await engine.define_meter(meter)
            events = self.events()
            for start in range(0, len(events), 5000):
                await engine.ingest(events[start:start + 5000])
            for limit in self.limits:
                await engine.add_limit(limit)
            async with trio.open_nursery() as nursery:
                for name, keys in (("open", KeyRing(())), ("keys", parse_keys(KEYS))):
                    server = HttpServer(engine, HttpConfig(host="127.0.0.1", port=0, keys=keys,
                                                           clock_ms=lambda: NOW,
                                                           drain_timeout_s=2.0))
                    server.app.streams.stats_interval_s = 0.2  # live updates arrive sooner
                    await nursery.start(server.serve)
                    self.servers[name] = server
                self.ready.set()
                await self._stop.wait()
                for server in self.servers.values():
                    server.shutdown()


def _browser_or_skip() -> Any:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (make browser installs Debian's chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the explorer's browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US",
                                  timezone_id=ZONE, accept_downloads=True)
    context.clock.set_fixed_time(datetime.fromtimestamp(NOW / 1000, UTC))
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, errors  # an uncaught error in the page fails the test


def renders(page: Any) -> int:
    return int(page.evaluate("document.documentElement.dataset.renders || '0'"))


def after(page: Any, action: Callable[[], object]) -> None:
    """Do ``action`` and wait until the page has rendered the view it leads to."""
    before = renders(page)
    action()
    page.wait_for_function(
        "n => +(document.documentElement.dataset.renders || 0) > n"
        " && document.documentElement.dataset.busy === '0'", arg=before)


def open_page(page: Any, address: str) -> None:
    """Load ``address`` (a new document: its render count starts again) and wait for its view."""
    page.goto(address)
    page.wait_for_function("() => +(document.documentElement.dataset.renders || 0) > 0"
                           " && document.documentElement.dataset.busy === '0'")


def plotted(page: Any) -> dict[str, Any]:
    """What the chart draws: the window starts and each series' exact values, and what the
    uPlot instance holds (a blank or missing chart fails here)."""
    view = page.evaluate("""() => {
        const v = window.explorer.view, c = window.explorer.chart;
        const canvas = document.querySelector('#chart canvas');
        let inked = 0;
        if (canvas) {
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 3; i < pixels.length; i += 16) if (pixels[i] > 0) inked++;
        }
        return { windows: v.windows, series: v.series, groupBy: v.groupBy,
                 chartSeries: c ? c.series.slice(1).map(s => s.label) : [],
                 chartData: c ? c.data.length : 0, inked };
    }""")
    assert view["chartData"] == len(view["series"]) + 1
    assert sorted(view["chartSeries"]) == sorted(s["label"] for s in view["series"])
    assert view["inked"] > 500, "the chart canvas is blank"
    return view


def by_window(result: QueryResult, key: str | None) -> dict[str | None, dict[int, str]]:
    found: dict[str | None, dict[int, str]] = {}
    for row in result.rows:
        label = row.group.get(key) if key else "total"
        found.setdefault(label, {})[row.window_start_ms] = str(row.value)
    return found


def series_by_label(view: dict[str, Any]) -> dict[str, dict[int, str]]:
    return {serie["label"]: {t: v for t, v in zip(view["windows"], serie["values"], strict=True)
                             if v is not None}
            for serie in view["series"]}


def table(page: Any) -> list[tuple[str, str]]:
    """The totals table's rows: (first group cell, exact value)."""
    return [tuple(row) for row in page.evaluate("""() =>
        [...document.querySelectorAll('#totals tbody tr[data-value]')].map(
            tr => [tr.cells[1].innerText.trim(), tr.dataset.value])""")]


def test_the_default_view_is_the_first_meter_by_day_over_seven_days(
        live: LiveServer, page: Any) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_page(page, live.url("/"))
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "ready"
    assert page.input_value("#meter") == "api_calls"  # alphabetically first
    assert page.input_value("#range") == "7d" and page.input_value("#window") == "day"
    assert page.input_value("#tz") == ZONE
    view = plotted(page)
    start_ms, end_ms = SEVEN_DAYS
    assert view["windows"] == [_berlin_midnight(d) for d in range(6, -1, -1)]
    assert view["groupBy"] == ["customer_id"]

    common = dict(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms, timezone=ZONE)
    top = live.query(**common, window="day", group_by=["customer_id"], take=Take(limit=10))
    everything = live.query(**common, window="day")
    series = series_by_label(view)
    expected = by_window(top, "customer_id")
    ranked = live.query(**common, group_by=["customer_id"], take=Take(limit=10))
    busiest_first = [r.group["customer_id"] for r in ranked.rows]
    assert list(series) == [*busiest_first, "other"]
    assert {k: v for k, v in series.items() if k != "other"} == expected
    # "other" is every customer outside the top 10, exactly, per day.
    all_by_day = by_window(everything, None)["total"]
    for window_start, total in all_by_day.items():
        top_sum = sum(Decimal(values.get(window_start, "0")) for values in expected.values())
        assert Decimal(series["other"][window_start]) == Decimal(total) - top_sum

    # The table: busiest first, 50 a page, the engine's exact totals.
    totals = live.query(**common, group_by=["customer_id"], take=Take(limit=50))
    assert table(page) == [(r.group["customer_id"], str(r.value)) for r in totals.rows]
    assert table(page)[0] == ("acme", "100000000000000000000.1")  # exact, never a float
    assert page.inner_text("#totals tbody tr:first-child td.num") == (
        "100,000,000,000,000,000,000.1")
    assert len(table(page)) == 50

    after(page, lambda: page.click("#page-next"))
    assert "page=2" in page.url
    rest = [(f"cust-{i:02d}", str((55 - i) * 7)) for i in range(49, 55)]
    assert table(page) == rest
    assert page.inner_text("#page-label") == "Page 2 of 2 · 56 groups"

    # Quietest first: the server ranks, so the order holds across pages.
    after(page, lambda: page.click("#sort-total"))
    assert "order=asc" in page.url and "page=" not in page.url
    quietest = live.query(**common, group_by=["customer_id"], take=Take(limit=50, ascending=True))
    assert table(page) == [(r.group["customer_id"], str(r.value)) for r in quietest.rows]

    # The legend works from the keyboard: Enter on an entry hides its series.
    entry = page.locator("#chart .u-legend .u-series[role='button']").first
    entry.focus()
    page.keyboard.press("Enter")
    assert entry.get_attribute("aria-pressed") == "false"
    assert page.evaluate("window.explorer.chart.series.filter(s => !s.show).length") == 1

    # Offline and native: everything came from this server, data only from native routes.
    origin = live.url("")
    for address in requested:
        assert address.startswith(origin), address
        path = address[len(origin):].split("?")[0]
        assert path == "/" or re.match(r"^/(explorer/|api/|alerts)", path), path


def test_changing_meter_range_group_and_filter(live: LiveServer, page: Any) -> None:
    open_page(page, live.url("/"))
    # Another meter: maxima are drawn as lines (stacking them means nothing), and "other"
    # is the maximum of the other customers, not a sum.
    after(page, lambda: page.select_option("#meter", "storage_gb"))
    assert "meter=storage_gb" in page.url
    assert page.input_value("#chart-kind") == "lines"
    start_ms, end_ms = SEVEN_DAYS
    view = plotted(page)
    common = dict(meter_api_name="storage_gb", start_ms=start_ms, end_ms=end_ms, window="day",
                  timezone=ZONE, group_by=["customer_id"])
    expected = by_window(live.query(**common, take=Take(limit=10)), "customer_id")
    every = by_window(live.query(**common), "customer_id")
    rest = [values for customer, values in every.items() if customer not in expected]
    series = series_by_label(view)
    assert {k: v for k, v in series.items() if k != "other"} == expected
    assert {t: Decimal(v) for t, v in series["other"].items()} == {
        t: max(Decimal(values[t]) for values in rest if t in values) for t in view["windows"]}

    # Last 24 hours, by hour.
    after(page, lambda: page.select_option("#meter", "api_calls"))
    after(page, lambda: page.select_option("#range", "24h"))
    assert page.input_value("#window") == "hour"
    view = plotted(page)
    end = (NOW // 60_000 + 1) * 60_000
    assert len(view["windows"]) in (24, 25)
    expected = live.query(meter_api_name="api_calls", start_ms=end - DAY, end_ms=end,
                          window="hour", timezone=ZONE, group_by=["customer_id"],
                          take=Take(limit=10))
    assert {k: v for k, v in series_by_label(view).items() if k != "other"} == by_window(
        expected, "customer_id")

    # Group by region instead of customer, over the 7 days.
    after(page, lambda: page.select_option("#range", "7d"))
    after(page, lambda: page.check("input[data-group-key='region']"))
    after(page, lambda: page.uncheck("input[data-group-key='customer_id']"))
    assert "group=region" in page.url
    view = plotted(page)
    expected = live.query(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms,
                          window="day", timezone=ZONE, group_by=["region"], take=Take(limit=10))
    assert series_by_label(view) == by_window(expected, "region")
    assert sorted(label for label, _ in table(page)) == ["eu", "us"]

    # A filter: only region us.
    page.select_option("#filter-key", "region")
    page.fill("#filter-value", "us")
    after(page, lambda: page.click("#filter-add"))
    assert "f=region%3Aus" in page.url
    view = plotted(page)
    assert [s["label"] for s in view["series"]] == ["us"]
    expected = live.query(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms,
                          window="day", timezone=ZONE, group_by=["region"],
                          filter={"region": ["us"]})
    assert series_by_label(view) == by_window(expected, "region")

    # The URL holds the view: loading it again shows the same thing.
    shared = page.url
    open_page(page, shared)
    assert series_by_label(plotted(page)) == by_window(expected, "region")

    # A custom range, in another zone: its bounds are local times there.
    open_page(page, live.url("/?range=custom&from=2026-09-19T06:00&to=2026-09-20T18:30"
                             "&window=hour&tz=America/New_York&group="))
    assert page.input_value("#from") == "2026-09-19T06:00"
    new_york = ZoneInfo("America/New_York")
    start = int(datetime(2026, 9, 19, 6, tzinfo=new_york).timestamp()) * 1000
    end = int(datetime(2026, 9, 20, 18, 30, tzinfo=new_york).timestamp()) * 1000
    view = plotted(page)
    assert view["windows"][0] == start and view["windows"][-1] == end - 30 * 60_000
    expected = live.query(meter_api_name="api_calls", start_ms=start, end_ms=end, window="hour",
                          timezone="America/New_York")
    assert series_by_label(view) == by_window(expected, None)


def test_downloads_hold_the_exact_view(live: LiveServer, page: Any) -> None:
    open_page(page, live.url("/?group=&range=7d"))
    with page.expect_download() as csv_download:
        page.click("#download-csv")
    lines = Path(csv_download.value.path()).read_text().splitlines()
    start_ms, end_ms = SEVEN_DAYS
    expected = live.query(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms,
                          window="day", timezone=ZONE)
    assert lines[0] == "window_start,window_start_ms,value"
    assert [line.split(",")[1:] for line in lines[1:]] == [
        [str(r.window_start_ms), str(r.value)] for r in expected.rows]
    with page.expect_download() as json_download:
        page.click("#download-json")
    document = json.loads(Path(json_download.value.path()).read_text(), parse_float=Decimal)
    assert document["meterApiName"] == "api_calls" and document["window"] == "day"
    assert [Decimal(str(v)) for v in document["series"][0]["values"]] == [
        Decimal(str(r.value)) for r in expected.rows]
    whole = live.query(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms,
                       timezone=ZONE)
    assert document["total"] == whole.rows[0].value  # digit for digit


def test_views_over_100000_points_are_refused_with_a_hint(live: LiveServer, page: Any) -> None:
    queried: list[str] = []
    page.on("request", lambda request: queried.append(request.post_data or "")
            if request.url.endswith("/api/query") else None)
    open_page(page, live.url("/?range=30d&window=minute"))
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "refused"
    status = page.inner_text("#status")
    assert "over the 100,000-point limit" in status and "coarser window" in status
    assert not any('"window":"minute"' in body for body in queried)  # never asked for
    after(page, lambda: page.click("#status button"))  # "Show by hour"
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "ready"
    assert "window=hour" in page.url


def test_unknown_meter_and_a_meter_without_usage(live: LiveServer, page: Any) -> None:
    open_page(page, live.url("/?meter=no_such_meter"))
    assert page.eval_on_selector("#status", "e => e.dataset.kind") == "error"
    assert "No meter named “no_such_meter”" in page.inner_text("#status")
    after(page, lambda: page.click("#status button:text('api_calls')"))
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "ready"

    open_page(page, live.url("/?meter=zeta_unused"))
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "empty"
    assert "No usage in this range" in page.inner_text("#status")


def test_the_customer_page(live: LiveServer, page: Any) -> None:
    open_page(page, live.url("/"))
    after(page, lambda: page.click("#totals a:text('acme')"))
    assert "view=customer" in page.url and "customer=acme" in page.url
    start_ms, end_ms = SEVEN_DAYS
    expected = live.query(meter_api_name="api_calls", start_ms=start_ms, end_ms=end_ms,
                          timezone=ZONE, filter={"customer_id": ["acme"]})
    card = page.locator(".meter-card[data-meter='api_calls']")
    assert card.get_attribute("data-total") == str(expected.rows[0].value)
    assert page.locator(".meter-card").count() == 1  # acme used one meter
    limit = page.locator(".limit[data-limit='acme-daily']")
    assert limit.get_attribute("data-usage") == "100000000000000000000.1"
    assert limit.locator(".mark").count() == 2 and limit.locator(".mark.reached").count() == 1
    assert "crossed 10 on api_calls" in page.inner_text("#customer-alerts")


def test_live_update_after_an_ingest(live: LiveServer, page: Any) -> None:
    open_page(page, live.url("/?group=&range=24h"))
    before = page.inner_text("#summary-total .v")
    page.wait_for_selector("#live[data-accepted]")  # the first count: what "new" is measured from
    assert live.engine is not None
    live.run(live.engine.ingest, [Event(meter_api_name="api_calls", customer_id="late-comer",
                                        meter_value=1000, meter_time_in_millis=NOW - 5_000)])
    page.wait_for_function("b => document.querySelector('#summary-total .v').innerText !== b",
                           arg=before)
    end = (NOW // 60_000 + 1) * 60_000
    expected = live.query(meter_api_name="api_calls", start_ms=end - DAY, end_ms=end)
    page.wait_for_function("() => document.documentElement.dataset.busy === '0'")
    assert page.inner_text("#summary-total .v").replace(",", "") == str(expected.rows[0].value)


def test_an_api_key_is_asked_for_and_a_customer_key_sees_its_customer(
        live: LiveServer, page: Any) -> None:
    page.goto(live.url("/", "keys"))
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "reader-key")
    after(page, lambda: page.click("#key-save"))
    assert page.eval_on_selector("#chart", "e => e.dataset.state") == "ready"
    assert page.evaluate("sessionStorage.length") == 1  # kept for this tab only

    other = page.context.new_page()
    other.goto(live.url("/", "keys"))
    other.wait_for_selector("#key-dialog[open]")
    other.fill("#key-input", "acme-key")
    other.click("#key-save")
    other.wait_for_function("() => document.documentElement.dataset.customer === 'acme'")
    other.wait_for_selector(".meter-card[data-meter='api_calls']")
    assert "customer=acme" in other.url
    assert other.is_hidden("#tab-usage")


def test_the_page_needs_nothing_from_elsewhere(live: LiveServer) -> None:
    response = requests.get(live.url("/?meter=x&range=7d"), timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        assert requests.get(live.url(asset), timeout=10).status_code == 200, asset
    license_text = requests.get(live.url("/explorer/uPlot.LICENSE.txt"), timeout=10).text
    assert "MIT License" in license_text
    assert requests.get(live.url("/explorer/../../serve.py"), timeout=10).status_code == 404
    assert requests.get(live.url("/explorer/nothing.js"), timeout=10).status_code == 404


def test_the_speed_benchmark_runs() -> None:
    """benchmarks/explorer.py on a tiny workload, so the script does not rot."""
    _browser_or_skip()
    from benchmarks import explorer

    args = explorer.parse_args(["--events", "3000", "--customers", "200", "--meters", "2",
                                "--shards", "2", "--repeats", "1", "--timeout-s", "120"])
    # A thread of its own: Playwright's sync API cannot start where another instance (this
    # module's browser fixture) is running.
    reports: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: reports.append(explorer.run(args)))
    runner.start()
    runner.join(300)
    assert reports, "the benchmark failed (its traceback is in the captured output)"
    report = reports[0]
    browser = report["browser"]
    assert browser["first_view"]["samples"] == 1 and browser["first_view"]["p50_ms"] > 0
    assert {"window_day_to_hour", "range_7d_to_30d", "table_next_page", "another_meter"} <= set(
        browser["changes"])
    assert "| first view | 1 |" in explorer.format_table(report)


async def test_the_page_is_served_while_the_engine_recovers() -> None:
    """The listener binds before recovery: the page and its files load, the API says 503."""
    from tests.http_support import http, open_http, url

    async with open_http(None) as server:
        page = await http("GET", url(server, "/"))
        script = await http("GET", url(server, "/explorer/explorer.js"))
        meters = await http("GET", url(server, "/api/meters"))
    assert page.status_code == 200 and "<title>Usage explorer" in page.text
    assert script.status_code == 200 and "engine is starting" in script.text
    assert meters.status_code == 503 and meters.headers["retry-after"]
