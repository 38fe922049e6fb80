"""The lightweight client: trio, one TCP connection, many requests in flight.

Shell layer: trio, ``engine.protocol``, ``engine.errors``, ``engine.schema`` and
``engine.runtime.groups`` (for ``unwrap_single``); never the engine itself. Use::

    async with open_client("127.0.0.1", 7433, api_key=None) as client:
        await client.define_meter(Meter(name="api_calls", aggregation="sum"))
        ack = await client.ingest([Event(...)])
        result = await client.query(Query(...))

Over TLS (a server started with ``--tls-cert``/``--tls-key``), pass a client
context, which checks the server's certificate against ``host``::

    context = ssl.create_default_context(cafile="ca.pem")  # or the system's CAs
    async with open_client("meter.example.com", 7433, key, ssl_context=context) as client:

Any number of tasks may share one client: each request gets an id, replies
are matched by id, so requests are pipelined on the connection. Errors the
server sends arrive as the same typed exceptions the embedded engine raises
(``BatchRejected`` with its ``problems``, ``InvalidQuery``, ``Forbidden``, ...).

Beside it: ``engine.batcher.open_batcher`` (buffers single events, flushes
by size and interval, retries on connection loss with the same unique ids) and
``engine.sync_client.SyncClient`` (a blocking wrapper for programs that are not
async); both stay importable from here.

The protocol state (ids in flight, open subscriptions, the server's limits)
is the sans-IO ``ClientConnection``'s; this module keeps the trio side: the
send lock, the events callers wait on and the reader task.
"""

from __future__ import annotations

import contextlib
import importlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from engine.client_statistics import RemoteStatistics, SubscriptionStatistics
from engine.domain.records import Correction
from engine.errors import ConnectionLost, MeteringError, map_exceptions
from engine.pricing.model import Invoice, Plan, PlanAssignment
from engine.protocol.connection import (
    MAX_REPLY_BYTES,
    NEED_DATA,
    ClientConnection,
    RemoteProtocolError,
    error_from_reply,
)
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    AddCustomer,
    AddLimit,
    AlertsPush,
    Amend,
    AssignmentReply,
    AssignPlan,
    BackupReply,
    BackupRequest,
    Cancel,
    CancelledReply,
    CancelWhere,
    CorrectionsReply,
    CustomerReply,
    CustomersReply,
    DefineMeter,
    DefinePlan,
    DeleteCustomer,
    ErrorReply,
    EventsReply,
    GetCustomer,
    GetInvoice,
    GetPlan,
    Hello,
    Ingest,
    IngestReply,
    InvoiceReply,
    Lagged,
    LimitReply,
    LimitsReply,
    ListCorrections,
    ListCustomers,
    ListLimits,
    ListMeters,
    ListPlans,
    MeterReply,
    MetersReply,
    Ping,
    PlanReply,
    PlansReply,
    QueryReply,
    QueryRequest,
    ReadEvents,
    RemovedReply,
    RemoveLimit,
    Stats,
    StatsReply,
    Subscribe,
    Unsubscribe,
    UpdateCustomer,
    Welcome,
)
from engine.runtime.groups import unwrap_single
from engine.schema import (
    Alert,
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

UNSUBSCRIBE_SEND_TIMEOUT_S = 5.0  # leaving a subscription never waits longer than this

__all__ = [
    "MAX_REPLY_BYTES",
    "BatcherStatistics",  # noqa: F822 (moved; served by __getattr__)
    "Client",
    "ClientSubscription",
    "RemoteStatistics",
    "SubscriptionStatistics",
    "SyncClient",  # noqa: F822 (moved; served by __getattr__)
    "error_from_reply",
    "open_batcher",  # noqa: F822 (moved; served by __getattr__)
    "open_client",
]

# Names that moved to their own modules, still importable from here (see __getattr__).
_MOVED = {
    "Batcher": "engine.batcher",
    "BatcherStatistics": "engine.batcher",
    "open_batcher": "engine.batcher",
    "SyncClient": "engine.sync_client",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


# The stream failing under us: the connection is gone.
TRANSPORT_ERRORS: dict[type[Exception], type[MeteringError]] = {
    trio.BrokenResourceError: ConnectionLost,
    trio.ClosedResourceError: ConnectionLost,
    OSError: ConnectionLost,
}


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None


class Client:
    """A connection to a metering-engine server. Create it with ``open_client``."""

    def __init__(self, stream: trio.abc.Stream, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self._stream = stream
        # Protocol state (ids in flight, open subscriptions, the welcome); the trio
        # objects waiting on it are here.
        self._protocol = ClientConnection(max_reply_bytes=max_reply_bytes)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._closed_error: MeteringError | None = None
        self._subscriptions: dict[int, ClientSubscription] = {}

    @property
    def welcome(self) -> Welcome | None:
        """The server's welcome (its limits), once the handshake is done."""
        return self._protocol.welcome

    # --------------------------------------------------------------- plumbing

    async def _send(self, message: Any) -> None:
        frame = self._protocol.send(message)  # a request over the frame limit raises here
        async with self._send_lock:
            if self._closed_error is not None:
                raise ConnectionLost(f"connection is closed: {self._closed_error}")
            try:
                await self._stream.send_all(frame)
            except BaseException as exc:
                # Possibly half a frame is on the wire: it would swallow the next request's
                # frame, so this connection cannot be used again.
                self._fail_all(ConnectionLost(f"a send was interrupted ({exc!r})"))
                with trio.CancelScope(shield=True):
                    await self._stream.aclose()
                raise

    async def _receive(self) -> Any:
        """The next message the protocol lets through; raises the server's breach as
        the typed error it amounts to."""
        while True:
            try:
                message = self._protocol.next_message()
            except RemoteProtocolError as exc:
                raise exc.error from None
            if message is not NEED_DATA:
                return message
            data = await self._stream.receive_some(256 * 1024)
            if not data:
                raise ConnectionLost("the server closed the connection")
            self._protocol.receive_data(data)

    async def _handshake(self, api_key: str | None, client_name: str) -> None:
        await self._send(Hello(version=PROTOCOL_VERSION, api_key=api_key, client=client_name))
        await self._receive()  # the welcome, or the server's refusal raised

    async def _reader(self) -> None:
        try:
            with map_exceptions(TRANSPORT_ERRORS):
                while True:
                    message = await self._receive()
                    if isinstance(message, AlertsPush | Lagged):
                        subscription = self._subscriptions.get(message.subscription)
                        if subscription is not None:
                            subscription._deliver(message)
                        continue
                    pending = self._pending.pop(message.id, None)
                    if pending is not None:  # None: a reply nobody waits for (unsubscribe)
                        pending.reply = message
                        pending.done.set()
        except MeteringError as exc:
            self._fail_all(exc)

    def _fail_all(self, error: MeteringError) -> None:
        if self._closed_error is None:
            self._closed_error = error
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()
        for subscription in self._subscriptions.values():
            subscription._wake()

    async def _call(self, message_type: type, **fields: Any) -> Any:
        return await self._call_with_id(self._protocol.next_request_id(), message_type,
                                        **fields)

    async def _call_with_id(self, request_id: int, message_type: type, **fields: Any) -> Any:
        if self._closed_error is not None:
            raise ConnectionLost(f"connection is closed: {self._closed_error}")
        pending = self._pending[request_id] = _Pending()
        try:
            try:
                with map_exceptions(TRANSPORT_ERRORS, "sending failed: {error}"):
                    await self._send(message_type(id=request_id, **fields))
            except BaseException:
                self._pending.pop(request_id, None)
                raise
            await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
            self._protocol.forget(request_id)  # a no-op once its reply arrived
        reply = pending.reply
        if reply is None:
            raise ConnectionLost(
                f"connection lost with the request in flight: {self._closed_error}"
            )
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply)
        return reply

    # ------------------------------------------------------------------- API

    async def ping(self) -> None:
        await self._call(Ping)

    async def define_meter(self, meter: Meter) -> Meter:
        reply: MeterReply = await self._call(DefineMeter, meter=meter)
        return reply.meter

    async def list_meters(self) -> list[Meter]:
        reply: MetersReply = await self._call(ListMeters)
        return reply.meters

    async def ingest(self, events: Sequence[Event], *, report_alerts: bool = False) -> IngestAck:
        reply: IngestReply = await self._call(Ingest, events=list(events),
                                              report_alerts=report_alerts)
        return IngestAck(accepted=reply.accepted, duplicates=reply.duplicates, lsn=reply.lsn,
                         alerts=reply.alerts)

    async def add_limit(self, limit: Limit) -> Limit:
        reply: LimitReply = await self._call(AddLimit, limit=limit)
        return reply.limit

    async def remove_limit(self, limit_id: str) -> bool:
        reply: RemovedReply = await self._call(RemoveLimit, limit_id=limit_id)
        return reply.removed

    async def cancel(self, meter_api_name: str, customer_id: str, *,
                     unique_ids: Sequence[str]) -> int:
        """``Engine.cancel`` over the wire (needs the ``correct`` scope; the key's name
        is the audit record's ``by``)."""
        reply: CancelledReply = await self._call(Cancel, meter_api_name=meter_api_name,
                                                 customer_id=customer_id,
                                                 unique_ids=list(unique_ids))
        return reply.cancelled

    async def cancel_where(self, meter_api_name: str, *, customer_id: str | None,
                           start_ms: int, end_ms: int,
                           dimensions: dict[str, list[str]] | None = None,
                           received_start_ms: int | None = None,
                           received_end_ms: int | None = None) -> int:
        """``Engine.cancel_where`` over the wire (the ``correct`` scope)."""
        reply: CancelledReply = await self._call(
            CancelWhere, meter_api_name=meter_api_name, customer_id=customer_id,
            start_ms=start_ms, end_ms=end_ms, dimensions=dimensions or {},
            received_start_ms=received_start_ms, received_end_ms=received_end_ms)
        return reply.cancelled

    async def amend(self, meter_api_name: str, customer_id: str, unique_id: str,
                    event: Event) -> IngestAck:
        """``Engine.amend`` over the wire (the ``correct`` scope)."""
        reply: IngestReply = await self._call(Amend, meter_api_name=meter_api_name,
                                              customer_id=customer_id, unique_id=unique_id,
                                              event=event)
        return IngestAck(accepted=reply.accepted, duplicates=reply.duplicates, lsn=reply.lsn)

    async def corrections(self, meter_api_name: str | None = None,
                          customer_id: str | None = None) -> list[Correction]:
        reply: CorrectionsReply = await self._call(ListCorrections,
                                                   meter_api_name=meter_api_name,
                                                   customer_id=customer_id)
        return reply.corrections

    async def list_limits(self) -> list[Limit]:
        reply: LimitsReply = await self._call(ListLimits)
        return reply.limits

    # ------------------------------------------------------------- pricing

    async def define_plan(self, plan: Plan) -> Plan:
        reply: PlanReply = await self._call(DefinePlan, plan=plan)
        assert reply.plan is not None
        return reply.plan

    async def get_plan(self, plan_id: str, version: int | None = None) -> Plan | None:
        reply: PlanReply = await self._call(GetPlan, plan_id=plan_id, version=version)
        return reply.plan

    async def plans(self) -> list[Plan]:
        reply: PlansReply = await self._call(ListPlans)
        return reply.plans

    async def assign_plan(self, customer_id: str, plan_id: str, *,
                          effective_from_ms: int) -> PlanAssignment:
        reply: AssignmentReply = await self._call(AssignPlan, customer_id=customer_id,
                                                  plan_id=plan_id,
                                                  effective_from_ms=effective_from_ms)
        return reply.assignment

    async def invoice(self, customer_id: str, at_ms: int) -> Invoice:
        reply: InvoiceReply = await self._call(GetInvoice, customer_id=customer_id, at_ms=at_ms)
        return reply.invoice

    async def add_customer(self, customer: Customer) -> Customer:
        reply: CustomerReply = await self._call(AddCustomer, customer=customer)
        assert reply.customer is not None
        return reply.customer

    async def update_customer(self, customer: Customer) -> Customer:
        reply: CustomerReply = await self._call(UpdateCustomer, customer=customer)
        assert reply.customer is not None
        return reply.customer

    async def get_customer(self, customer_id: str) -> Customer | None:
        reply: CustomerReply = await self._call(GetCustomer, customer_id=customer_id)
        return reply.customer

    async def list_customers(self) -> list[Customer]:
        reply: CustomersReply = await self._call(ListCustomers)
        return reply.customers

    async def delete_customer(self, customer_id: str) -> Customer | None:
        reply: CustomerReply = await self._call(DeleteCustomer, customer_id=customer_id)
        return reply.customer

    async def backup(self, path: str) -> Backup:
        """Ask the server to write a consistent copy of its data directory to ``path``,
        a path on the server's machine (``Engine.backup``; needs the ``admin`` scope).
        Returns once the copy is complete; the server keeps serving meanwhile."""
        reply: BackupReply = await self._call(BackupRequest, path=path)
        return Backup(path=reply.path, lsn=reply.lsn, size_bytes=reply.size_bytes)

    async def raw_events(self, start_ms: int, end_ms: int, *,
                         meter_api_name: str | None = None, customer_id: str | None = None,
                         from_lsn: int = 0, from_index: int = 0,
                         limit: int = 10_000) -> RawEventPage:
        """A page of the raw events retained with event time in ``[start_ms, end_ms)``
        (``Engine.raw_events``): page on with ``from_lsn=page.next_lsn,
        from_index=page.next_index`` until ``page.done``."""
        reply: EventsReply = await self._call(
            ReadEvents, start_ms=start_ms, end_ms=end_ms, meter_api_name=meter_api_name,
            customer_id=customer_id, from_lsn=from_lsn, from_index=from_index, limit=limit)
        return RawEventPage(events=reply.events, next_lsn=reply.next_lsn,
                            next_index=reply.next_index, done=reply.done)

    async def iter_raw_events(self, start_ms: int, end_ms: int, *,
                              meter_api_name: str | None = None,
                              customer_id: str | None = None,
                              page_events: int = 10_000) -> AsyncIterator[list[Event]]:
        """Every page's events of ``raw_events`` over the range, until the last page."""
        from_lsn = from_index = 0
        while True:
            page = await self.raw_events(start_ms, end_ms, meter_api_name=meter_api_name,
                                         customer_id=customer_id, from_lsn=from_lsn,
                                         from_index=from_index, limit=page_events)
            if page.events:
                yield page.events
            if page.done:
                return
            from_lsn, from_index = page.next_lsn, page.next_index

    @asynccontextmanager
    async def subscribe(self, from_seq: int = 0) -> AsyncIterator[ClientSubscription]:
        """Alerts with seq >= ``from_seq``, pushed by the server: stored ones, then live ones.

        Iterate it with ``async for``. If the connection drops, iteration raises
        ``ConnectionLost``: reconnect and subscribe again from ``subscription.next_seq``
        to receive every alert exactly once.
        """
        subscription = ClientSubscription(self, from_seq)
        await subscription._open()
        try:
            yield subscription
        finally:
            with trio.CancelScope(shield=True):
                await subscription._close()

    async def query(self, query: Query) -> QueryResult:
        reply: QueryReply = await self._call(QueryRequest, query=query)
        return reply.result

    async def stats(self) -> dict[str, Any]:
        """The server's ``stats`` map as sent (engine fields, then ``server_*`` ones)."""
        reply: StatsReply = await self._call(Stats)
        return reply.stats

    async def statistics(self) -> RemoteStatistics:
        """The server's statistics as a record, the remote ``Engine.statistics()``."""
        return RemoteStatistics.from_stats(await self.stats())

    async def meters(self) -> list[Meter]:
        """Every meter definition (``Engine.meters()``; same as ``list_meters``)."""
        return await self.list_meters()


class ClientSubscription:
    """A live alert subscription on one connection (see ``Client.subscribe``).

    Alerts wait in a bounded buffer until read. A reader that falls behind by
    more than ``buffer_alerts`` is counted in ``lagged`` and the subscription is
    reopened from its ``next_seq``: nothing is lost and nothing repeats.
    ``statistics()`` gives these counters as one record.
    """

    buffer_alerts = 10_000

    def __init__(self, client: Client, from_seq: int) -> None:
        self._client = client
        self.next_seq = from_seq
        # The server's next alert seq when it opened the subscription (``subscribed``):
        # the alerts before it are stored ones being replayed, later ones are live.
        self.server_next_seq = 0
        self.lagged = 0
        self.server_lag_notices = 0
        self._id: int | None = None
        self._buffer: deque[Alert] = deque()
        self._overflowed = False
        self._arrived = trio.Event()

    async def _open(self) -> None:
        request_id = self._client._protocol.next_request_id()
        self._id = request_id
        self._buffer.clear()
        self._overflowed = False
        # Registered before the request is sent: pushes may precede the reply (the
        # protocol routes them from the moment the Subscribe is sent).
        self._client._subscriptions[request_id] = self
        try:
            reply = await self._client._call_with_id(request_id, Subscribe,
                                                     from_seq=self.next_seq)
        except BaseException:
            self._client._subscriptions.pop(request_id, None)
            raise
        self.server_next_seq = reply.next_seq

    async def _close(self) -> None:
        subscription_id, self._id = self._id, None
        if subscription_id is None:
            return
        self._client._subscriptions.pop(subscription_id, None)
        self._client._protocol.end_subscription(subscription_id)
        if self._client._closed_error is None:
            # Sent without waiting for the reply: this runs shielded, often because the
            # caller's scope was cancelled, which may have cancelled the reader task too,
            # and then no reply would ever be read. Pushes already on their way are
            # dropped by the reader, as the subscription is no longer registered.
            with trio.move_on_after(UNSUBSCRIBE_SEND_TIMEOUT_S), \
                    contextlib.suppress(MeteringError, trio.BrokenResourceError,
                                        trio.ClosedResourceError, OSError):
                await self._client._send(Unsubscribe(
                    id=self._client._protocol.next_request_id(), subscription=subscription_id))

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(next_seq=self.next_seq, buffered_alerts=len(self._buffer),
                                      lagged=self.lagged,
                                      server_lag_notices=self.server_lag_notices)

    def _deliver(self, push: AlertsPush | Lagged) -> None:
        if isinstance(push, Lagged):
            self.server_lag_notices += 1
            return
        if self._overflowed:
            return
        room = self.buffer_alerts - len(self._buffer)
        self._buffer.extend(push.alerts[:max(room, 0)])
        if room < len(push.alerts):
            self._overflowed = True  # drop the rest; reopen from next_seq once read
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    def __aiter__(self) -> ClientSubscription:
        return self

    async def __anext__(self) -> Alert:
        while True:
            while self._buffer:
                alert = self._buffer.popleft()
                if alert.seq >= self.next_seq:
                    self.next_seq = alert.seq + 1
                    return alert
            if self._overflowed:
                self.lagged += 1
                await self._close()
                await self._open()
                continue
            if self._client._closed_error is not None:
                raise ConnectionLost(
                    f"subscription ended: {self._client._closed_error}; "
                    f"resubscribe from seq {self.next_seq}"
                )
            await self._arrived.wait()


@asynccontextmanager
async def open_client(
    host: str,
    port: int,
    api_key: str | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout_s: float = 10.0,
    client_name: str = "engine.client",
) -> AsyncIterator[Client]:
    """Connect, say hello (with the API key), and yield a ``Client``.

    With ``ssl_context`` the connection is TLS, and the server's certificate must be
    valid for ``host`` under that context; a failed TLS handshake raises
    ``ConnectionLost`` saying why (an untrusted certificate, a server without TLS).
    Connecting, the TLS handshake and the hello each get ``connect_timeout_s``.
    """
    with trio.fail_after(connect_timeout_s):
        tcp_stream = await trio.open_tcp_stream(host, port)
    stream: trio.abc.Stream = tcp_stream
    if ssl_context is not None:
        stream = trio.SSLStream(tcp_stream, ssl_context, server_hostname=host)
    async with stream:
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(connect_timeout_s):
                    await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise ConnectionLost(
                    f"TLS handshake with {host}:{port} failed: {exc.__cause__ or exc!r}"
                ) from None
        client = Client(stream)
        try:
            with trio.fail_after(connect_timeout_s):
                await client._handshake(api_key, client_name)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"handshake failed: {exc!r}") from None
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
                    client._fail_all(ConnectionLost("client closed"))
