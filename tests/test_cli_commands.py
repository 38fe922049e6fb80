"""The ``meter`` commands against one live ``meter serve`` (API keys on, port 0).

Commands run in this process through ``engine.cli.main`` (what the ``meter`` script
calls), with ``METER_PORT`` and ``METER_API_KEY`` in the environment, as a user
would set them; a few run as real subprocesses where the process boundary is the
point (``meter watch`` streaming, a failure's stderr being one line).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from benchmarks.serve import ServerProcess, child_env
from engine.cli import build_parser, main

ADMIN, READER, ACME = "admin-key-1", "query-key-1", "acme-key-1"
KEYS = {"keys": [
    {"key": ADMIN, "scopes": ["admin", "ingest", "query"], "name": "admin"},
    {"key": READER, "scopes": ["query"], "name": "reader"},
    {"key": ACME, "scopes": ["ingest", "query"], "customer_id": "acme", "name": "acme"},
]}
NOW = time.time_ns() // 1_000_000
MINUTE = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("cli-commands")
    keys = base / "keys.json"
    keys.write_text(json.dumps(KEYS))
    with ServerProcess(2, base / "data", flags=["--keys", str(keys)],
                       log=base / "server.log") as process:
        yield process


def cli(server: ServerProcess, *argv: str, key: str | None = ADMIN) -> tuple[int, str, str]:
    """``meter ARGV`` with the server's port and ``key`` in the environment."""
    env = {"METER_PORT": str(server.port), "METER_HOST": "127.0.0.1"}
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
        os.environ.pop("METER_API_KEY", None)
        if key is not None:
            os.environ["METER_API_KEY"] = key
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def ok(server: ServerProcess, *argv: str, key: str | None = ADMIN) -> str:
    code, out, err = cli(server, *argv, key=key)
    assert code == 0, f"meter {' '.join(argv)} exited {code}: {err}"
    return out


def events_file(path: Path, events: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return str(path)


def call(customer: str, unique_id: str | None, ts: int, meter: str = "calls",
         value: Any = 1, **dimensions: str) -> dict[str, Any]:
    event: dict[str, Any] = {"meterApiName": meter, "customerId": customer,
                             "meterValue": value, "meterTimeInMillis": ts}
    if dimensions:
        event["dimensions"] = dimensions
    if unique_id is not None:
        event["uniqueId"] = unique_id
    return event


def leaf_parsers(parser: argparse.ArgumentParser,
                 path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from leaf_parsers(sub, (*path, name))


def test_every_command_has_help_with_an_example() -> None:
    commands = dict(leaf_parsers(build_parser()))
    for name in [("meters", "define"), ("meters", "list"), ("limits", "add"),
                 ("limits", "list"), ("limits", "remove"), ("watch",), ("customers", "add"),
                 ("customers", "list"), ("customers", "show"), ("export",), ("ingest",),
                 ("query",), ("serve",), ("stats",), ("backup",), ("demo",)]:
        assert name in commands, f"meter {' '.join(name)} is missing"
    for name, parser in commands.items():
        text = parser.format_help()
        assert "\nexample:\n  meter " in text, f"meter {' '.join(name)} --help has no example"
        if "--port" in text and name != ("serve",):
            assert "$METER_API_KEY" in text, f"meter {' '.join(name)} ignores METER_API_KEY"


def test_meters_define_and_list(server: ServerProcess) -> None:
    assert ok(server, "meters", "define", "calls", "--aggregation", "sum") == "defined calls: sum\n"
    ok(server, "meters", "define", "users", "--aggregation", "unique_count",
       "--unique-dimension", "user_id", "--description", "active users")
    # Idempotent: the same definition again succeeds and prints the stored one.
    again = ok(server, "meters", "define", "users", "--aggregation", "unique_count",
               "--unique-dimension", "user_id", "--json")
    assert json.loads(again) == {"name": "users", "aggregation": "unique_count",
                                 "uniqueDimension": "user_id", "description": "active users"}
    listed = json.loads(ok(server, "meters", "list", "--json"))
    assert {m["name"]: m.get("aggregation", "sum") for m in listed} == {
        "calls": "sum", "users": "unique_count"}
    table = ok(server, "meters", "list", key=READER)
    assert "users: unique_count of user_id  (active users)" in table.splitlines()

    code, out, err = cli(server, "meters", "define", "calls", "--aggregation", "max")
    assert (code, out) == (1, "")
    assert err.startswith("meter meters define: ") and "'calls'" in err
    assert err.count("\n") == 1
    code, _, err = cli(server, "meters", "define", "seats", "--aggregation", "unique_count")
    assert code == 1 and "unique_dimension" in err
    code, _, err = cli(server, "meters", "define", "x", "--aggregation", "sum", key=READER)
    assert code == 1 and err.startswith("meter meters define: ") and "admin" in err


def test_limits_add_list_remove(server: ServerProcess) -> None:
    ok(server, "meters", "define", "calls", "--aggregation", "sum")
    added = ok(server, "limits", "add", "calls-daily", "--meter", "calls",
               "--threshold", "100,2.5", "--threshold", "1000", "--customer", "globex",
               "--period", "month", "--timezone", "Europe/Berlin", "--filter", "region=eu,us")
    assert added == ("added calls-daily: calls per month (Europe/Berlin), customer globex, "
                     "region in eu,us: 100, 2.5, 1000\n")
    limits = json.loads(ok(server, "limits", "list", "--json", key=READER))
    limit = next(item for item in limits if item["id"] == "calls-daily")
    assert limit == {"id": "calls-daily", "meterApiName": "calls",
                     "thresholds": [100, "2.5", 1000], "customerId": "globex",
                     "period": "month", "timezone": "Europe/Berlin",
                     "filter": {"region": ["eu", "us"]}}
    assert ok(server, "limits", "remove", "calls-daily") == "removed calls-daily\n"
    assert "calls-daily" not in ok(server, "limits", "list")
    code, _, err = cli(server, "limits", "remove", "calls-daily")
    assert code == 1 and err == "meter limits remove: there is no limit 'calls-daily'\n"
    code, _, err = cli(server, "limits", "add", "bad", "--meter", "nope", "--threshold", "1")
    assert code == 1 and err.startswith("meter limits add: ") and "nope" in err
    code, _, err = cli(server, "limits", "add", "bad", "--meter", "calls", "--threshold", "ten")
    assert code == 2 and err == "meter limits add: 'ten' is not a number\n"


def _alert_count(server: ServerProcess) -> int:
    return int(json.loads(ok(server, "stats", "--json"))["alerts"])


def test_watch_streams_alerts_as_they_arrive_and_resumes(server: ServerProcess,
                                                         tmp_path: Path) -> None:
    ok(server, "meters", "define", "watched", "--aggregation", "sum")
    ok(server, "limits", "add", "watched-total", "--meter", "watched", "--threshold", "10,20",
       "--period", "total")
    first_seq = _alert_count(server)
    ok(server, "ingest", events_file(tmp_path / "a.ndjson",
                                     [call("wally", "w-1", NOW, "watched", 12)]))
    env = {**child_env(), "METER_PORT": str(server.port), "METER_API_KEY": READER}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "engine", "watch", "--from-seq", str(first_seq), "--count", "2",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killer = threading.Timer(60, watcher.kill)  # a hang guard, not a timing bound
    killer.start()
    try:
        assert watcher.stdout is not None
        stored = json.loads(watcher.stdout.readline())  # raised before the watch began
        assert (stored["seq"], stored["threshold"], stored["value"]) == (first_seq, 10, 12)
        # The watcher is subscribed now: this alert reaches it live.
        ok(server, "ingest", events_file(tmp_path / "b.ndjson",
                                         [call("wally", "w-2", NOW, "watched", 9)]))
        live = json.loads(watcher.stdout.readline())
        assert (live["seq"], live["threshold"], live["value"]) == (first_seq + 1, 20, 21)
        assert watcher.wait() == 0
    finally:
        killer.cancel()
        watcher.kill()
        watcher.wait()
        for pipe in (watcher.stdout, watcher.stderr):
            if pipe is not None:
                pipe.close()
    # Resumed from the last seq seen + 1: only the later alert, none twice.
    resumed = ok(server, "watch", "--from-seq", str(first_seq + 1), "--no-follow", key=READER)
    assert resumed.splitlines() == [
        f"#{first_seq + 1}  {_utc_seconds(live['crossedAtMs'])}  wally  watched-total: watched "
        "reached 20 (usage 21, period all time)"]
    # Without --from-seq only alerts raised from now on: none yet.
    assert ok(server, "watch", "--no-follow", key=READER) == ""


def _utc_seconds(ms: int) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def test_customers_add_list_show(server: ServerProcess, tmp_path: Path) -> None:
    assert ok(server, "customers", "add", "initech", "--name", "Initech", "--email",
              "ops@initech.example", "--trait", "plan=pro", "--trait", "region=eu") == (
        "added initech  Initech  plan=pro region=eu\n")
    ok(server, "meters", "define", "calls", "--aggregation", "sum")
    ok(server, "ingest", events_file(tmp_path / "u.ndjson", [call("usage-only", None, NOW)]))
    listed = ok(server, "customers", "list", key=READER).splitlines()
    assert "initech  Initech  plan=pro region=eu" in listed
    assert "usage-only  (known by usage only)" in listed
    shown = ok(server, "customers", "show", "initech").splitlines()
    assert shown[:6] == ["id            initech", "name          Initech",
                         "email         ops@initech.example", "enabled       yes",
                         "trait plan    pro", "trait region  eu"]
    as_json = json.loads(ok(server, "customers", "show", "initech", "--json"))
    assert as_json["traits"] == {"plan": "pro", "region": "eu"}
    code, out, err = cli(server, "customers", "show", "nobody")
    assert (code, out, err) == (1, "", "meter customers show: there is no customer 'nobody'\n")
    code, _, err = cli(server, "customers", "add", "initech", "--name", "Again")
    assert code == 1 and err.startswith("meter customers add: ")
    code, _, err = cli(server, "customers", "add", "x", "--trait", "plan")
    assert code == 2 and err == "meter customers add: --trait 'plan': use KEY=VALUE\n"
    # A customer-bound key sees only its own customer.
    assert ok(server, "customers", "list", key=ACME).endswith("(0 customers)\n")


def test_export_a_query_as_csv_and_json(server: ServerProcess, tmp_path: Path) -> None:
    ok(server, "meters", "define", "exported", "--aggregation", "sum")
    ts = (NOW // MINUTE) * MINUTE - 30 * MINUTE
    ok(server, "ingest", events_file(tmp_path / "q.ndjson", [
        call("acme", "q-1", ts, "exported", 2, region="eu"),
        call("acme", "q-2", ts + MINUTE, "exported", "0.5", region="us"),
        call("bob", "q-3", ts, "exported", 7),
    ]))
    span = ["--start", str(ts - MINUTE), "--end", str(ts + 2 * MINUTE)]
    csv_text = ok(server, "export", "exported", "--group-by", "customer_id,region", *span)
    start = _utc_seconds(ts - MINUTE)
    assert csv_text.splitlines() == [
        "window_start,window_start_ms,customer_id,region,value",
        f"{start},{ts - MINUTE},acme,eu,2",
        f"{start},{ts - MINUTE},acme,us,0.5",
        f"{start},{ts - MINUTE},bob,,7",
    ]
    out_file = tmp_path / "usage.json"
    assert ok(server, "export", "exported", "--format", "json", "--window", "minute",
              "--filter", "customer_id=acme", "-o", str(out_file), *span) == ""
    rows = json.loads(out_file.read_text())["rows"]
    assert [(r["windowStartMs"], r["value"]) for r in rows] == [(ts, 2), (ts + MINUTE, "0.5")]
    code, _, err = cli(server, "export", "--format", "csv", *span)
    assert code == 2 and "needs a METER" in err


def test_export_raw_events_round_trips_through_ingest(server: ServerProcess,
                                                      tmp_path: Path) -> None:
    ok(server, "meters", "define", "raw", "--aggregation", "sum")
    ts = (NOW // MINUTE) * MINUTE - 20 * MINUTE
    sent = [
        call("acme", "r-1", ts, "raw", 1, region="eu"),
        call("acme", "r-1", ts, "raw", 1, region="eu"),  # a retry: counted once
        call("acme", None, ts + 1, "raw", "2.5"),
        call("bob", "r-2", ts + 2, "raw", 3),
        call("bob", "r-3", ts - 10 * MINUTE, "raw", 4),  # before the range
    ]
    ok(server, "ingest", events_file(tmp_path / "raw.ndjson", sent), "--batch-size", "2")
    ok(server, "ingest", events_file(tmp_path / "retry.ndjson", [sent[3]]))  # a later retry
    span = ["--start", str(ts - MINUTE), "--end", str(ts + MINUTE)]
    exported = [json.loads(line) for line in
                ok(server, "export", "raw", "--events", *span, key=READER).splitlines()]
    assert exported == [sent[0], {**sent[2], "meterValue": "2.5"}, sent[3]]
    # What a customer-bound key exports is its own customer's events only.
    own = ok(server, "export", "raw", "--events", *span, key=ACME).splitlines()
    assert [json.loads(line)["customerId"] for line in own] == ["acme", "acme"]
    code, _, err = cli(server, "export", "raw", "--events", "--customer", "bob", *span, key=ACME)
    assert code == 1 and err.startswith("meter export: ")
    # The export is meter ingest's input as it is: every event with an id is known.
    path = tmp_path / "exported.ndjson"
    assert ok(server, "export", "--events", "--customer", "acme", "-o", str(path), *span) == ""
    again = ok(server, "ingest", str(path))
    assert "read 2 events: accepted 1, duplicates 1, rejected 0" in again
    code, _, err = cli(server, "export", "raw", "--events", "--group-by", "region", *span)
    assert code == 2 and err == "meter export: --group-by shape a query, not --events\n"
    code, _, err = cli(server, "export", "raw", "--events", "--format", "csv", *span)
    assert code == 2 and err == "meter export: --format csv shape a query, not --events\n"
    assert ok(server, "export", "raw", "--events", "--format", "ndjson", *span) != ""


def test_failures_are_one_line_without_a_traceback(server: ServerProcess) -> None:
    for key in (None, "wrong"):
        code, out, err = cli(server, "meters", "list", key=key)
        assert (code, out, err) == (1, "", "meter meters list: invalid API key\n")
    code, _, err = cli(server, "query", "calls", "--start", "yesterday")
    assert code == 2 and err == ("meter query: 'yesterday' is neither milliseconds nor an "
                                 "ISO 8601 time\n")
    code, _, err = cli(server, "query", "no-such-meter")
    assert code == 1 and err == "meter query: unknown meter 'no-such-meter'\n"
    # As a process: nothing but the one line on stderr, for a server that is not there.
    env = {**child_env(), "METER_PORT": "1"}
    done = subprocess.run([sys.executable, "-m", "engine", "customers", "list"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("meter customers list: ") and done.stderr.count("\n") == 1
