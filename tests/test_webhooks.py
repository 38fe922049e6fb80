"""Alert webhooks against a real HTTP receiver on 127.0.0.1 that fails on purpose:
signatures, per-URL seq order, retries, parking and redelivery, and a restart that
resumes from the saved progress without skipping an alert."""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import msgspec
import pytest
import trio

from engine import Alert, Engine, Event, Limit, Meter, open_engine
from engine.errors import InvalidRequest
from engine.http.webhooks import (
    SEQ_HEADER,
    SIGNATURE_HEADER,
    Progress,
    WebhookDispatcher,
    WebhookSettings,
    sign,
    verify,
)
from engine.storage import MemoryStore
from tests.helpers.serve import server_process
from tests.http_support import NOW, http, open_http, url

SECRET = b"whsec-test"
CUT_SHORT = 1200  # Receiver: answer 200, then close before the body's end
FAST = {"backoff_initial_s": 0.005, "backoff_max_s": 0.02, "request_timeout_s": 5.0}


@dataclass
class Delivery:
    seq: int
    signature: str
    body: bytes
    status: int


@dataclass
class Receiver:
    """Answers each POST with ``answer(seq, attempt)``: 200, or a failure on purpose
    (500, 503, or 0 to close the connection without an answer)."""

    answer: Callable[[int, int], int] = lambda seq, attempt: 200
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts?team=ops"

    def accepted(self) -> list[int]:
        return [d.seq for d in self.deliveries if d.status in (200, CUT_SHORT)]

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        with trio.move_on_after(10):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    connection.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            headers = {name.decode().lower(): value.decode() for name, value in request.headers}
            assert request.target == b"/hooks/alerts?team=ops"
            assert headers["content-type"] == "application/json"
            seq = int(headers[SEQ_HEADER.lower()])
            attempt = sum(1 for d in self.deliveries if d.seq == seq)
            status = self.answer(seq, attempt)
            self.deliveries.append(Delivery(seq, headers[SIGNATURE_HEADER.lower()], body,
                                            status))
            if status == 0:
                await stream.aclose()
                return
            if status == CUT_SHORT:  # a 200 whose body ends early: still a success
                await stream.send_all(connection.send(h11.Response(
                    status_code=200, headers=[(b"content-length", b"100")])) +
                    connection.send(h11.Data(data=b"ok")))
                await stream.aclose()
                return
            await stream.send_all(connection.send(h11.Response(
                status_code=status, headers=[(b"content-length", b"2")])) +
                connection.send(h11.Data(data=b"ok")) + connection.send(h11.EndOfMessage()))
            await stream.aclose()


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, receiver.handle, 0, host="127.0.0.1"))
        receiver.port = listeners[0].socket.getsockname()[1]
        yield receiver
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def dispatching(engine: Engine, **settings: Any) -> AsyncIterator[WebhookDispatcher]:
    dispatcher = WebhookDispatcher(engine, WebhookSettings(secret=SECRET, **{**FAST, **settings}),
                                   clock_ms=lambda: NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        yield dispatcher
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (the deadline only stops a broken test; nothing is timed)."""
    with trio.fail_after(30):
        while not condition():
            await trio.sleep(0.005)


async def usage(engine: Engine, customer: str, value: int, at_ms: int = NOW) -> None:
    await engine.ingest([Event(meter_api_name="calls", customer_id=customer, meter_value=value,
                               meter_time_in_millis=at_ms)])


async def stored_alerts(engine: Engine) -> list[Alert]:
    found = []
    async with engine.subscribe(0) as subscription:
        while len(found) < engine.next_alert_seq():
            found.append(await subscription.__anext__())
    return found


def test_signature_and_verification() -> None:
    body = b'{"seq":1}'
    header = sign(SECRET, 1_700_000_000_000, body)
    assert header.startswith("t=1700000000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, 1_700_000_000_000 + 60_000)
    assert not verify(SECRET, header, body + b" ", 1_700_000_000_000)
    assert not verify(b"other", header, body, 1_700_000_000_000)
    assert not verify(SECRET, header, body, 1_700_000_000_000 + 3_600_000)  # too old
    assert not verify(SECRET, "v1=00", body, 1_700_000_000_000)


async def test_each_url_gets_its_alerts_signed_in_seq_order_despite_failures() -> None:
    # The limit's URL fails twice for every alert (a 500, then a dropped connection);
    # the server-wide URL takes everything at once.
    flaky = Receiver(lambda seq, attempt: [500, 0][attempt] if attempt < 2 else 200)
    everything = Receiver(lambda seq, attempt: CUT_SHORT if seq % 2 else 200)
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=lambda: NOW) as engine, \
            receiving(flaky), receiving(everything):
        await engine.define_meter(Meter(name="calls"))
        await engine.add_limit(Limit(id="hooked", meter_api_name="calls", thresholds=[1, 5, 9],
                                     customer_id="acme", webhook_url=flaky.url))
        await engine.add_limit(Limit(id="plain", meter_api_name="calls", thresholds=[2],
                                     customer_id="beta"))
        async with dispatching(engine, default_url=everything.url) as dispatcher:
            await usage(engine, "acme", 6)  # crosses 1 and 5
            await usage(engine, "beta", 3)  # crosses 2: not the limit's URL
            await usage(engine, "acme", 4)  # crosses 9
            alerts = await stored_alerts(engine)
            assert len(alerts) == 4
            hooked = [a.seq for a in alerts if a.limit_id == "hooked"]
            await until(lambda: len(flaky.accepted()) == 3 and len(everything.accepted()) == 4)
            # the receivers record a delivery before they answer it: wait for the answers
            await until(lambda: dispatcher.delivered == 7
                        and dispatcher.statistics().backlog == 0)
        assert flaky.accepted() == hooked == [0, 1, 3]
        # in seq order per URL: every attempt at an alert comes before the next alert
        assert [d.seq for d in flaky.deliveries] == [s for s in hooked for _ in range(3)]
        assert [d.status for d in flaky.deliveries] == [500, 0, 200] * 3
        assert everything.accepted() == [0, 1, 2, 3]
        by_seq = {a.seq: a for a in alerts}
        for delivery in flaky.deliveries + everything.deliveries:
            assert verify(SECRET, delivery.signature, delivery.body, NOW)
            assert msgspec.json.decode(delivery.body, type=Alert) == by_seq[delivery.seq]
        assert json.loads(everything.deliveries[0].body)["limitId"] == "hooked"
        assert dispatcher.delivered == 7 and dispatcher.failed_attempts == 6


async def test_parked_after_the_retry_time_listed_and_redelivered() -> None:
    down = {"on": True}
    receiver = Receiver(lambda seq, attempt: 503 if down["on"] else 200)
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: NOW) as engine, \
            receiving(receiver):
        await engine.define_meter(Meter(name="calls"))
        await engine.add_limit(Limit(id="l", meter_api_name="calls", thresholds=[1, 2],
                                     webhook_url=receiver.url))
        async with dispatching(engine, retry_for_s=0.03) as dispatcher, \
                open_http(engine) as server:
            server.attach_webhooks(dispatcher)
            await usage(engine, "acme", 5)
            await until(lambda: len(dispatcher.progress.parked) == 2)
            failed = (await http("GET", url(server, "/webhooks/failed"))).json()["failed"]
            assert [(f["url"], f["seq"], f["lastError"]) for f in failed] == [
                (receiver.url, 0, "HTTP 503"), (receiver.url, 1, "HTTP 503")]
            assert all(f["attempts"] >= 2 for f in failed)
            metrics = (await http("GET", url(server, "/metrics"))).text
            assert "meter_webhooks_parked 2.0" in metrics
            assert "meter_alert_lag 0.0" in metrics  # parked: the worker went on
            down["on"] = False
            one = await http("POST", url(server, "/webhooks/redeliver"),
                             json={"url": receiver.url, "seq": 1})
            assert [p["seq"] for p in one.json()["redelivered"]] == [1]
            await until(lambda: receiver.accepted() == [1])
            rest = await http("POST", url(server, "/webhooks/redeliver"))
            assert [p["seq"] for p in rest.json()["redelivered"]] == [0]
            await until(lambda: receiver.accepted() == [1, 0])
            assert (await http("GET", url(server, "/webhooks/failed"))).json() == {"failed": []}
            none = await http("POST", url(server, "/webhooks/redeliver"), json={"seq": 7})
            assert none.json() == {"redelivered": []}
            bad = await http("POST", url(server, "/webhooks/redeliver"), json={"sq": 1})
            assert bad.status_code == 400


async def test_a_restart_resumes_from_the_saved_progress_and_skips_nothing(
        tmp_path: Path) -> None:
    state = tmp_path / "data" / "webhooks.json"
    up_to = {"seq": 2}  # the receiver takes alerts below this, fails the rest
    receiver = Receiver(lambda seq, attempt: 200 if seq < up_to["seq"] else 500)

    def opened() -> Any:
        return open_engine(tmp_path / "data", shards=2, clock_ms=lambda: NOW)

    async with receiving(receiver):
        async with opened() as engine:
            await engine.define_meter(Meter(name="calls"))
            await engine.add_limit(Limit(id="l", meter_api_name="calls",
                                         thresholds=[1, 2, 3, 4, 5], webhook_url=receiver.url))
            async with dispatching(engine, state_path=state):
                await usage(engine, "acme", 3)  # alerts 0, 1, 2
                await until(lambda: receiver.accepted() == [0, 1] and any(
                    d.seq == 2 for d in receiver.deliveries))
            saved = msgspec.json.decode(state.read_bytes(), type=Progress)
            assert saved.cursors == {receiver.url: 2}  # 2 was never delivered
            await usage(engine, "acme", 2)  # alerts 3 and 4, while nobody delivers
        up_to["seq"] = 10
        async with opened() as engine, dispatching(engine, state_path=state) as dispatcher:
            await until(lambda: receiver.accepted() == [0, 1, 2, 3, 4])
            # the cursor moves in memory first, then is saved: wait for the file
            await until(lambda: msgspec.json.decode(state.read_bytes(), type=Progress)
                        .cursors == {receiver.url: 5})
            assert dispatcher.progress.parked == []


async def test_webhook_urls_are_checked(engine: Engine) -> None:
    await engine.define_meter(Meter(name="calls"))
    for bad in ("ftp://x/", "http://", "not a url", "http://a b/"):
        with pytest.raises(InvalidRequest, match="webhook_url"):
            await engine.add_limit(Limit(id="l", meter_api_name="calls", thresholds=[1],
                                         webhook_url=bad))
    async with open_http(engine) as server:
        added = await http("POST", url(server, "/limits"), json={
            "id": "l", "meterApiName": "calls", "thresholds": [1],
            "webhookUrl": "https://hooks.example.test/alerts"})
        assert added.status_code == 200 and added.json()["webhookUrl"].startswith("https://")
        refused = await http("POST", url(server, "/limits"), json={
            "id": "m", "meterApiName": "calls", "thresholds": [1], "webhookUrl": "ftp://x/"})
        assert refused.status_code == 400
        off = await http("GET", url(server, "/webhooks/failed"))
        assert off.status_code == 404 and off.json()["code"] == "webhooks_off"


async def test_meter_serve_delivers_webhooks_from_its_flags(tmp_path: Path) -> None:
    """``meter serve --webhook-url --webhook-secret-file``: one process, end to end."""
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text("s3cret-from-file\n")
    receiver = Receiver()
    async with receiving(receiver), server_process(
            tmp_path / "data", tmp_path / "server.log", "--http-port", "0",
            "--webhook-url", receiver.url, "--webhook-secret-file", str(secret_file)) as served:
        ready = re.search(r"HTTP ready on http://127\.0\.0\.1:(\d+)/", "".join(served.lines))
        assert ready, served.lines
        base = f"http://127.0.0.1:{ready.group(1)}"
        now_ms = time.time_ns() // 1_000_000
        for path, body in (("/meters", {"meterApiName": "calls"}),
                           ("/limits", {"id": "l", "meterApiName": "calls", "thresholds": [1]}),
                           ("/ingest", {"customerId": "acme", "meterApiName": "calls",
                                        "meterValue": 1, "meterTimeInMillis": now_ms})):
            answer = await http("POST", base + path, json=body)
            assert answer.status_code == 200, answer.text
        await until(lambda: receiver.accepted() == [0])
        (delivery,) = receiver.deliveries
        assert verify(b"s3cret-from-file", delivery.signature, delivery.body,
                      time.time_ns() // 1_000_000)
        assert json.loads(delivery.body)["customerId"] == "acme"
        progress = tmp_path / "data" / "webhooks.json"
        await until(lambda: msgspec.json.decode(progress.read_bytes(), type=Progress)
                    .cursors == {receiver.url: 1})
        assert await trio.to_thread.run_sync(served.terminate) == 0


def test_serve_refuses_a_webhook_url_without_a_secret(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cli_serve import webhook_settings

    monkeypatch.delenv("METER_WEBHOOK_SECRET", raising=False)

    def settings(**flags: Any) -> Any:
        return webhook_settings(argparse.Namespace(**{
            "webhook_url": None, "webhook_secret_file": None, "webhook_retry_hours": 24.0,
            "data_dir": str(tmp_path), **flags}))

    assert settings() is None  # no secret, no webhooks
    with pytest.raises(ValueError, match="needs a secret"):
        settings(webhook_url="http://127.0.0.1:9/")
    monkeypatch.setenv("METER_WEBHOOK_SECRET", "from-env")
    chosen = settings(webhook_url="http://127.0.0.1:9/", webhook_retry_hours=0.5)
    assert (chosen.secret, chosen.retry_for_s, chosen.state_path) == (
        b"from-env", 1800.0, tmp_path / "webhooks.json")
    with pytest.raises(ValueError, match="webhook_url"):
        settings(webhook_url="ftp://x/")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        settings(webhook_secret_file=str(tmp_path / "empty"))


def test_the_verification_example_in_the_docs_verifies() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "http.md").read_text()
    (block,) = re.findall(r"```py\n(.*?)```", doc, re.S)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    body = b'{"seq":3,"value":100000000000000000000.5}'
    header = sign(SECRET, time.time_ns() // 1_000_000, body)
    assert namespace["verify"](SECRET, header, body)
    assert not namespace["verify"](SECRET, header, body.replace(b"3", b"4"))
    assert not namespace["verify"](b"wrong", header, body)
    assert not namespace["verify"](SECRET, sign(SECRET, 1_000, body), body)  # too old


async def test_an_unreadable_progress_file_is_refused_and_a_failed_save_is_survived(
        tmp_path: Path) -> None:
    broken = tmp_path / "webhooks.json"
    broken.write_text("{not json")
    receiver = Receiver()
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: NOW) as engine, \
            receiving(receiver):
        await engine.define_meter(Meter(name="calls"))
        await engine.add_limit(Limit(id="l", meter_api_name="calls", thresholds=[1, 2],
                                     webhook_url=receiver.url))
        refusing = WebhookDispatcher(engine, WebhookSettings(secret=SECRET, state_path=broken))
        with pytest.raises(ValueError, match="unreadable"):
            await refusing.run()
        # A directory that does not exist: every save fails; deliveries go on.
        nowhere = tmp_path / "missing" / "webhooks.json"
        async with dispatching(engine, state_path=nowhere) as dispatcher:
            await usage(engine, "acme", 2)
            await until(lambda: receiver.accepted() == [0, 1])
            assert dispatcher.save_failures >= 2 and not nowhere.exists()


async def test_alerts_raised_before_the_dispatcher_runs_are_not_left_out() -> None:
    receiver = Receiver()
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=lambda: NOW) as engine, \
            receiving(receiver):
        await engine.define_meter(Meter(name="calls"))
        first = engine.next_alert_seq()  # as meter serve takes it, before serving
        await engine.add_limit(Limit(id="l", meter_api_name="calls", thresholds=[1, 2]))
        await usage(engine, "acme", 2)  # two alerts before the dispatcher starts
        dispatcher = WebhookDispatcher(engine, WebhookSettings(
            secret=SECRET, default_url=receiver.url, **FAST), start_seq=first)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            await until(lambda: receiver.accepted() == [0, 1])
            nursery.cancel_scope.cancel()
