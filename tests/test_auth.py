"""API keys and scopes: key file validation, and what each kind of key may do over TCP."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from engine import Engine, Event, Meter, Query
from engine.auth import (
    ENV_VAR,
    SCOPES,
    AuthConfigError,
    KeyRing,
    Principal,
    load_keys,
    parse_keys,
)
from engine.client import open_client
from engine.errors import Forbidden, ProtocolError, Unauthorized
from engine.server import InsecureBind, MeterServer, ServerConfig
from tests.conftest import HOST, NOW

DAY = 86_400_000
ALL = Query(meter_api_name="calls", start_ms=NOW - 10 * DAY, end_ms=NOW + DAY)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


KEYS = {"keys": [
    {"key": "admin-key", "scopes": ["admin", "ingest", "query"], "name": "ops"},
    {"key": "ingest-key", "scopes": ["ingest"]},
    {"key": "query-key", "scopes": ["query"]},
    {"key": "acme-key", "scopes": ["ingest", "query"], "customer_id": "acme"},
    {"key_sha256": sha256("hashed-key"), "scopes": ["query"]},
]}


def event(customer: str = "acme", value: int = 1, **fields: Any) -> Event:
    return Event(meter_api_name="calls", customer_id=customer, meter_value=value,
                 meter_time_in_millis=NOW, **fields)


def by_customer(**fields: Any) -> Query:
    return msgspec.structs.replace(ALL, group_by=["customer_id"], **fields)


# ------------------------------------------------------------------ parse_keys

BAD_CONFIGS = [
    ([], "must be an object"),
    ({"key": "x"}, "must be an object"),
    ({"keys": {"key": "x"}}, "must be an object"),
    ({"keys": ["admin-key"]}, "key entry 0 must be an object"),
    ({"keys": [{"scopes": ["query"]}]}, "needs 'key' or 'key_sha256'"),
    ({"keys": [{"key": "", "scopes": ["query"]}]}, "needs 'key' or 'key_sha256'"),
    ({"keys": [{"key": 12345, "scopes": ["query"]}]}, "needs 'key' or 'key_sha256'"),
    ({"keys": [{"key_sha256": "xyz" * 20, "scopes": ["query"]}]}, "not hex"),
    ({"keys": [{"key_sha256": "ab" * 31, "scopes": ["query"]}]}, "64 hex digits"),
    ({"keys": [{"key_sha256": "ab" * 33, "scopes": ["query"]}]}, "64 hex digits"),
    ({"keys": [{"key": "k"}]}, "scopes must be a non-empty list"),
    ({"keys": [{"key": "k", "scopes": []}]}, "scopes must be a non-empty list"),
    ({"keys": [{"key": "k", "scopes": "query"}]}, "scopes must be a non-empty list"),
    ({"keys": [{"key": "k", "scopes": ["query", "root"]}]}, "scopes must be a non-empty list"),
    ({"keys": [{"key": "k", "scopes": ["query"], "customer_id": ""}]}, "customer_id must be"),
    ({"keys": [{"key": "k", "scopes": ["query"], "customer_id": 7}]}, "customer_id must be"),
    ({"keys": [{"key": "k", "scopes": ["admin"], "customer_id": "acme"}]}, "cannot be admin"),
    ({"keys": [{"key": "good", "scopes": ["query"]}, {"key": "bad", "scopes": []}]}, "entry 1"),
]


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS)
def test_parse_keys_refuses_malformed_configs(config: object, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        parse_keys(config)


def test_parse_keys_and_authenticate() -> None:
    ring = parse_keys(KEYS)
    assert ring.enabled and len(ring.entries) == 5
    admin = ring.authenticate("admin-key")
    assert admin == Principal(SCOPES - {"correct"}, None, "ops")
    assert ring.authenticate("acme-key") == Principal(frozenset({"ingest", "query"}), "acme",
                                                      "key 3")
    assert ring.authenticate("hashed-key") == Principal(frozenset({"query"}), None, "key 4")
    for wrong in (None, "", "admin-key ", "ADMIN-KEY", sha256("hashed-key"), "hashed"):
        assert ring.authenticate(wrong) is None, wrong
    # Uppercase hex is hex too.
    upper = parse_keys({"keys": [{"key_sha256": sha256("k").upper(), "scopes": ["query"]}]})
    assert upper.authenticate("k") is not None


def test_no_keys_means_everyone_is_admin() -> None:
    ring = KeyRing(())
    assert not ring.enabled
    assert ring.authenticate(None) is not None and ring.authenticate(None).scopes == SCOPES


def test_a_client_without_a_key_is_never_authenticated() -> None:
    """``{"key_sha256": sha256("")}`` is what a provisioning script writes when the key
    variable it hashes is unset; it must not open the server to clients without a key."""
    ring = None
    with pytest.raises(AuthConfigError):
        ring = parse_keys({"keys": [{"key_sha256": sha256(""), "scopes": ["ingest"]}]})
    assert ring is None or (ring.authenticate(None) is None and ring.authenticate("") is None)


def test_load_keys_from_file_and_environment(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not load_keys().enabled  # nothing configured
    monkeypatch.setenv(ENV_VAR, "   ")
    assert not load_keys().enabled
    monkeypatch.setenv(ENV_VAR, json.dumps(KEYS))
    assert load_keys().authenticate("query-key") is not None
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        load_keys()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "file-key", "scopes": ["query"]}]}))
    ring = load_keys(path)  # the file wins over the environment
    assert ring.authenticate("file-key") is not None and ring.authenticate("query-key") is None
    with pytest.raises(AuthConfigError, match="cannot read API key file"):
        load_keys(tmp_path / "missing.json")


# ---------------------------------------------------------------- over the wire


@pytest.fixture
async def keyed(engine: Engine, serving: Any) -> AsyncIterator[MeterServer]:
    await engine.define_meter(Meter(name="calls"))
    await engine.ingest([event("acme", 1), event("globex", 10), event("initech", 100)])
    async with serving(engine, keys=parse_keys(KEYS)) as server:
        yield server


@asynccontextmanager
async def connect(server: MeterServer, key: str | None) -> AsyncIterator[Any]:
    assert server.port is not None
    async with open_client(HOST, server.port, api_key=key) as client:
        yield client


async def totals(eng: Engine) -> dict[str, Any]:
    result = await eng.query(by_customer())
    return {row.group["customer_id"]: row.value for row in result.rows}


async def test_missing_or_wrong_keys_are_unauthorized_alike(keyed: MeterServer) -> None:
    messages = set()
    for key in (None, "", "wrong", "admin-key-", "Admin-Key", sha256("hashed-key")):
        with pytest.raises(Unauthorized) as caught:
            async with connect(keyed, key):
                pass
        assert isinstance(caught.value, ProtocolError) and caught.value.code == "unauthorized"
        messages.add(str(caught.value))
    assert messages == {"invalid API key"}, "a failure must not say which part was wrong"
    assert keyed.stats.protocol_errors == 6
    async with connect(keyed, "query-key") as client:
        await client.ping()


async def test_query_only_key(engine: Engine, keyed: MeterServer) -> None:
    before = await totals(engine)
    async with connect(keyed, "query-key") as client:
        await client.ping()
        assert [m.name for m in await client.list_meters()] == ["calls"]
        assert (await client.query(ALL)).rows[0].value == 111
        with pytest.raises(Forbidden, match="may not ingest"):
            await client.ingest([event()])
        with pytest.raises(Forbidden, match="may not admin"):
            await client.define_meter(Meter(name="sneaky"))
        with pytest.raises(Forbidden, match="may not admin"):
            await client.stats()
        await client.ping()  # still connected
    assert await totals(engine) == before
    assert [m.name for m in engine.meters()] == ["calls"]


async def test_ingest_only_key(engine: Engine, keyed: MeterServer) -> None:
    async with connect(keyed, "ingest-key") as client:
        ack = await client.ingest([event("globex", 5), event("acme", 5)])
        assert ack.accepted == 2
        with pytest.raises(Forbidden, match="may not query"):
            await client.query(ALL)
        with pytest.raises(Forbidden, match="may not query"):
            await client.list_meters()
        with pytest.raises(Forbidden):
            await client.define_meter(Meter(name="calls"))
    assert await totals(engine) == {"acme": 6, "globex": 15, "initech": 100}


async def test_customer_bound_key_ingests_only_its_customer(
    engine: Engine, keyed: MeterServer
) -> None:
    before = await totals(engine)
    async with connect(keyed, "acme-key") as client:
        with pytest.raises(Forbidden, match="event 0: this API key may only send events of its"):
            await client.ingest([event("globex", 1000)])
        with pytest.raises(Forbidden, match="event 2"):
            await client.ingest([event("acme", 1000), event("acme", 1000), event("globex", 1000)])
        assert await totals(engine) == before  # nothing applied, not even the acme events
        ack = await client.ingest([event("acme", 2, unique_id="a1"), event("acme", 2,
                                                                          unique_id="a1")])
        assert (ack.accepted, ack.duplicates) == (1, 1)
        with pytest.raises(Forbidden):
            await client.define_meter(Meter(name="calls"))
        with pytest.raises(Forbidden):
            await client.stats()
    assert await totals(engine) == {**before, "acme": before["acme"] + 2}


async def test_customer_bound_key_sees_only_its_customer(engine: Engine,
                                                         keyed: MeterServer) -> None:
    await engine.ingest([event("acme", 4, dimensions={"region": "eu"}),
                         event("globex", 40, dimensions={"region": "eu"})])
    async with connect(keyed, "acme-key") as client:
        # No filter at all: only acme's usage, not everyone's.
        assert [row.value for row in (await client.query(ALL)).rows] == [5]
        grouped = await client.query(by_customer())
        assert [(row.group, row.value) for row in grouped.rows] == [({"customer_id": "acme"}, 5)]
        by_region = await client.query(msgspec.structs.replace(ALL, group_by=["region"],
                                                               window="day"))
        assert sum(row.value for row in by_region.rows) == 5
        assert (await client.query(by_customer(filter={"customer_id": ["acme"]}))).rows[0].value \
            == 5
        for customers in (["globex"], ["acme", "globex"], ["initech", "acme"]):
            with pytest.raises(Forbidden, match="only query its own customer"):
                await client.query(by_customer(filter={"customer_id": customers}))
        # A filter on a dimension does not widen the scope either.
        eu = await client.query(msgspec.structs.replace(ALL, filter={"region": ["eu"]}))
        assert [row.value for row in eu.rows] == [4]
        await client.ping()


async def test_admin_key_and_hashed_key(engine: Engine, keyed: MeterServer) -> None:
    async with connect(keyed, "admin-key") as admin:
        assert await admin.define_meter(Meter(name="peak", aggregation="max")) == Meter(
            name="peak", aggregation="max")
        stats = await admin.stats()
        assert stats["server_connections"] == 1 and stats["meter_count"] == 2
        await admin.ingest([event("globex", 1), event("umbrella", 1)])
        assert await totals(engine) == {"acme": 1, "globex": 11, "initech": 100, "umbrella": 1}
        assert len((await admin.query(by_customer())).rows) == 4
    async with connect(keyed, "hashed-key") as reader:
        assert (await reader.query(ALL)).rows[0].value == 113
        with pytest.raises(Forbidden):
            await reader.ingest([event()])


# ------------------------------------------------------------------ binding


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "example.com"])
async def test_binding_beyond_loopback_without_keys_is_refused(engine: Engine, host: str) -> None:
    with pytest.raises(InsecureBind, match="refusing to listen"):
        MeterServer(engine, ServerConfig(host=host, port=0))
    # Constructing (not serving) is fine with the explicit override, or with keys and TLS
    # (without TLS the keys would cross the network in clear: tests/test_tls.py).
    MeterServer(engine, ServerConfig(host=host, port=0, allow_insecure_bind=True))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    MeterServer(engine, ServerConfig(host=host, port=0, keys=parse_keys(KEYS), ssl_context=tls))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
async def test_loopback_needs_no_keys(engine: Engine, host: str) -> None:
    MeterServer(engine, ServerConfig(host=host, port=0))


async def test_keyed_server_on_loopback_really_serves(engine: Engine, serving: Any) -> None:
    async with serving(engine, keys=parse_keys(KEYS)) as server:
        with trio.fail_after(5):
            async with connect(server, "admin-key") as client:
                await client.define_meter(Meter(name="calls"))
                await client.ingest([event()])
        assert server.stats.connections_total == 1
