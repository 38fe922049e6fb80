"""``meter cancel`` and ``meter amend`` against a live ``meter serve`` (keys on, port 0)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serve import ServerProcess
from tests.test_cli_commands import call, cli, events_file, ok

ADMIN, FIXER = "admin-key-1", "fixer-key-1"
KEYS = {"keys": [
    {"key": ADMIN, "scopes": ["admin", "ingest", "query"], "name": "admin"},
    {"key": FIXER, "scopes": ["correct", "query"], "name": "fixer"},
]}
NOW = time.time_ns() // 1_000_000
MINUTE = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("cli-corrections")
    keys = base / "keys.json"
    keys.write_text(json.dumps(KEYS))
    with ServerProcess(2, base / "data", flags=["--keys", str(keys)],
                       log=base / "server.log") as process:
        yield process


def test_cancel_and_amend_from_the_command_line(server: ServerProcess, tmp_path: Path) -> None:
    ok(server, "meters", "define", "calls", "--aggregation", "sum")
    ok(server, "ingest", events_file(tmp_path / "e.ndjson", [
        call("acme", "e-1", NOW - 5 * MINUTE, value=1),
        call("acme", "e-2", NOW - 4 * MINUTE, value=2, region="eu"),
        call("acme", "e-3", NOW - 3 * MINUTE, value=4),
        call("globex", "g-1", NOW - 2 * MINUTE, value=8, region="eu")]))
    code, _, err = cli(server, "cancel", "calls", "--customer", "acme", "--id", "e-1")
    assert code != 0 and len(err.strip().splitlines()) == 1  # the admin key lacks `correct`
    assert ok(server, "cancel", "calls", "--customer", "acme", "--id", "e-1", "--id", "x",
              key=FIXER).strip() == "cancelled 1 event"
    assert ok(server, "cancel", "calls", "--all-customers", "--from", str(NOW - 10 * MINUTE),
              "--to", str(NOW), "--filter", "region=eu", key=FIXER).strip() == \
        "cancelled 2 events"
    assert "amended e-3" in ok(server, "amend", "calls", "--customer", "acme", "--id", "e-3",
                               "--value", "40", "--time", str(NOW - 3 * MINUTE), key=FIXER)
    out = ok(server, "query", "calls", "--start", str(NOW - 10 * MINUTE), "--end", str(NOW),
             "--json")
    # one row: e-1, e-2 and g-1 cancelled, e-3 amended from 4 to 40 (not 47 or 44)
    assert [row["value"] for row in json.loads(out)["rows"]] == [40]
    code, _, err = cli(server, "cancel", "calls", "--customer", "acme", key=FIXER)
    assert code != 0 and "--from" in err
