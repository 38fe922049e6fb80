"""A blocking client for programs that are not async.

Shell layer: trio (in a background thread) and ``engine.client``. Each call
runs the ``Client`` method of the same name on that thread's event loop and
waits for it; errors arrive as the same typed exceptions.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar, TypeVarTuple

import trio

from engine.client import Client, RemoteStatistics, open_client
from engine.errors import ConnectionLost
from engine.pricing.model import Invoice, Plan, PlanAssignment
from engine.schema import (
    Backup,
    Customer,
    Event,
    IngestAck,
    Limit,
    Meter,
    Query,
    QueryResult,
    RawEventPage,
)

__all__ = ["SyncClient"]

_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")


class SyncClient:
    """A blocking client for programs that are not async.

    Runs a trio event loop with one ``Client`` in a background thread::

        with SyncClient("127.0.0.1", 7433) as client:
            client.ingest([Event(...)])
    """

    def __init__(self, host: str, port: int, api_key: str | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: connect over TLS (as ``open_client``)."""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port, api_key, ssl_context),
                                        name="metering-engine-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self, host: str, port: int, api_key: str | None,
             ssl_context: ssl.SSLContext | None) -> None:
        async def main() -> None:
            try:
                async with open_client(host, port, api_key, ssl_context=ssl_context) as client:
                    self._client = client
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                if not self._ready.is_set():
                    self._error = exc
                    self._ready.set()
                else:
                    raise

        trio.run(main)

    def _call(self, method: Callable[[Client, *_Ts], Awaitable[_R]], *args: *_Ts) -> _R:
        """Run ``method(client, *args)`` on the client's event loop and wait for it."""
        if self._token is None or self._client is None:
            raise ConnectionLost("client is closed")
        return trio.from_thread.run(method, self._client, *args, trio_token=self._token)

    def ping(self) -> None:
        self._call(Client.ping)

    def define_meter(self, meter: Meter) -> Meter:
        return self._call(Client.define_meter, meter)

    def list_meters(self) -> list[Meter]:
        return self._call(Client.list_meters)

    def meters(self) -> list[Meter]:
        return self._call(Client.meters)

    def ingest(self, events: Sequence[Event]) -> IngestAck:
        return self._call(Client.ingest, events)

    def query(self, query: Query) -> QueryResult:
        return self._call(Client.query, query)

    def stats(self) -> dict[str, Any]:
        return self._call(Client.stats)

    def statistics(self) -> RemoteStatistics:
        return self._call(Client.statistics)

    def add_limit(self, limit: Limit) -> Limit:
        return self._call(Client.add_limit, limit)

    def remove_limit(self, limit_id: str) -> bool:
        return self._call(Client.remove_limit, limit_id)

    def list_limits(self) -> list[Limit]:
        return self._call(Client.list_limits)

    def add_customer(self, customer: Customer) -> Customer:
        return self._call(Client.add_customer, customer)

    def update_customer(self, customer: Customer) -> Customer:
        return self._call(Client.update_customer, customer)

    def get_customer(self, customer_id: str) -> Customer | None:
        return self._call(Client.get_customer, customer_id)

    def list_customers(self) -> list[Customer]:
        return self._call(Client.list_customers)

    def delete_customer(self, customer_id: str) -> Customer | None:
        return self._call(Client.delete_customer, customer_id)

    def define_plan(self, plan: Plan) -> Plan:
        return self._call(Client.define_plan, plan)

    def get_plan(self, plan_id: str, version: int | None = None) -> Plan | None:
        return self._call(Client.get_plan, plan_id, version)

    def plans(self) -> list[Plan]:
        return self._call(Client.plans)

    def assign_plan(self, customer_id: str, plan_id: str, *,
                    effective_from_ms: int) -> PlanAssignment:
        async def assign(client: Client) -> PlanAssignment:
            return await client.assign_plan(customer_id, plan_id,
                                            effective_from_ms=effective_from_ms)
        return self._call(assign)

    def invoice(self, customer_id: str, at_ms: int) -> Invoice:
        return self._call(Client.invoice, customer_id, at_ms)

    def backup(self, path: str) -> Backup:
        return self._call(Client.backup, path)

    def raw_events(self, start_ms: int, end_ms: int, *, meter_api_name: str | None = None,
                   customer_id: str | None = None, from_lsn: int = 0, from_index: int = 0,
                   limit: int = 10_000) -> RawEventPage:
        """A page of the raw events retained with event time in ``[start_ms, end_ms)``
        (``Client.raw_events``): page on with ``from_lsn=page.next_lsn,
        from_index=page.next_index`` until ``page.done``."""
        async def read(client: Client) -> RawEventPage:
            return await client.raw_events(
                start_ms, end_ms, meter_api_name=meter_api_name, customer_id=customer_id,
                from_lsn=from_lsn, from_index=from_index, limit=limit)
        return self._call(read)

    def iter_raw_events(self, start_ms: int, end_ms: int, *,
                        meter_api_name: str | None = None, customer_id: str | None = None,
                        page_events: int = 10_000) -> Iterator[list[Event]]:
        """Every page's events of ``raw_events`` over the range, until the last page
        (one request per page, made as the iteration reaches it)."""
        from_lsn = from_index = 0
        while True:
            page = self.raw_events(start_ms, end_ms, meter_api_name=meter_api_name,
                                   customer_id=customer_id, from_lsn=from_lsn,
                                   from_index=from_index, limit=page_events)
            if page.events:
                yield page.events
            if page.done:
                return
            from_lsn, from_index = page.next_lsn, page.next_index

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._token = None
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
